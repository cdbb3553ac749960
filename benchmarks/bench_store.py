"""Patch-store codec benchmark: JPEG-coded tiles against lossless ones, side by side in one run.

One synthetic Aperio-like SVS (default 20 000 x 15 000 px at 0.25 um/px, JPEG q90 256 px tiles,
pyramid 1/4/16 as 40x scanners write it, so 0.5 um/px tiles are resampled from level 0;
``--pyramid 1,2,4,8,16`` gives a level that matches the target instead), tiled at 0.5 um/px into
224 px tiles with one worker, once per codec: ``lossless`` (Blosc-lz4), ``jpeg`` at each of
``--qualities``, and coordinates only (its tiles are direct reads from the slide, one
``read_region`` per tile: the reference). For each store it prints

- tiling rate (tiles/s, one worker) and bytes per tile (the chunk files of ``tiles``);
- PSNR of the stored tiles against direct reads, on a sample of ``--sample`` tiles spread over
  the slide;
- cosine between the features of the stored tiles and of the lossless tiles, per tile (mean,
  min), for efficientnet-lite0 (the card's ImageNet weights), the random-weight test ViT, and
  ViT-B/16 (the ``vitb16-imagenet`` card's architecture; random weights when its files are absent);
- read cost per tile on the extraction path: ``PatchStore.read_tiles`` of batches of 64
  consecutive tiles (what each DataLoader item reads) over the whole store, one thread, best of
  5 passes taking turns between the stores;
- for the choice of chroma subsampling: the sampled lossless tiles coded at each quality with
  4:2:0 instead of the store's 4:4:4 (the same encoder call), their size and efficientnet-lite0
  cosine; and, as a yardstick of the encoder's sensitivity, the cosine after adding uniform
  noise of +-1 grey level to every pixel of the lossless tiles;

and the ratios jpeg / lossless for size and read cost.

``--image`` measures the codec on a photograph of real tissue instead of a slide (e.g.
``skimage:immunohistochemistry``, scikit-image's 512 x 512 IHC image of colonic glands, or any
RGB image file): 224 px crops at a stride of ``--image-stride`` px (24 by default, so crops fall
on every phase of the 8 px JPEG block grid), each coded by the store's own chunk encoder and
decoded as ``PatchStore.read_tiles`` decodes it; bytes per tile, PSNR and efficientnet-lite0 /
test-ViT cosine against the crops themselves (4:4:4 and 4:2:0). ``--image-downsample N`` first
shrinks the image N times by area averaging (the tiler's rule for a resampled read), e.g. a 40x
photograph measured as the 20x tiles a 0.5 um/px store holds. ``--jpegxl 0.3,0.5`` adds JPEG XL
at those distances beside the store's JPEG (size, fidelity, encode and decode time per tile): a
yardstick for the codec choice, not a codec the store offers.

    python benchmarks/bench_store.py [--size 20000x15000] [--qualities 90,95,97] [--slide PATH]
    python benchmarks/bench_store.py --image skimage:immunohistochemistry [--qualities 90,95,96,97]
    python benchmarks/bench_store.py --image he_40x.png --image-downsample 2 [--jpegxl 0.3,0.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsitools.encoders import build_encoder, find_card
from wsitools.store import CHUNK_TILES, JPEG_SUBSAMPLING, PatchStore, TileCodec, encode_jpeg
from wsitools.synthetic import Region, write_slide
from wsitools.tiling import TilingParams, tile_slide

CARDS = ("efficientnet-lite0-imagenet", "vit-test-tiny", "vitb16-imagenet")


def make_slide(path: Path, width: int, height: int, pyramid: tuple[int, ...]) -> Path:
    """Three tissue ellipses over about 40% of the slide (as benchmarks/bench_tiling.py)."""
    regions = [
        Region(int(width * 0.05), int(height * 0.1), int(width * 0.4), int(height * 0.8)),
        Region(int(width * 0.5), int(height * 0.05), int(width * 0.45), int(height * 0.5)),
        Region(int(width * 0.55), int(height * 0.6), int(width * 0.3), int(height * 0.35), "other"),
    ]
    t = time.perf_counter()
    write_slide(path, size=(width, height), mpp=0.25, regions=regions, fmt="svs", downsamples=pyramid)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")
    return path


def tiles_bytes(store: PatchStore) -> int:
    """Bytes of the chunk files of the store's ``tiles`` array."""
    return sum(f.stat().st_size for f in (store.path / "tiles" / "c").rglob("*") if f.is_file())


def psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """PSNR in dB of ``a`` against ``b`` ([n, S, S, 3] uint8): over all the tiles, and of the worst tile."""
    mse = ((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):  # identical pixels: inf dB
        db = 10 * np.log10(255.0**2 / np.array([mse.mean(), mse.max()]))
    return float(db[0]), float(db[1])


def read_ms_per_tile(stores: dict[str, PatchStore], rounds: int = 5) -> dict[str, float]:
    """ms per tile of reading each whole store in batches of 64: the best of ``rounds`` passes,
    the stores taking turns within each round, so that a busy spell on a shared machine slows
    all of them rather than one."""
    best = dict.fromkeys(stores, np.inf)
    for _ in range(rounds):
        for label, store in stores.items():
            t = time.perf_counter()
            for a in range(0, len(store), CHUNK_TILES):
                store.read_tiles(slice(a, a + CHUNK_TILES))
            best[label] = min(best[label], (time.perf_counter() - t) / len(store) * 1e3)
    return {label: float(ms) for label, ms in best.items()}


def encoders(names: tuple[str, ...]) -> dict[str, object]:
    """The cards' encoders in fp32 on the CPU; random weights where a card's files are absent."""
    out = {}
    for name in names:
        card = find_card(name)
        note = ""
        if not all(w.path.is_file() for w in card.weights):
            card = dataclasses.replace(card, weights=(), init_seed=0)
            note = " (random weights: files absent)"
        elif not card.weights:
            note = " (random-weight test model)"
        card = dataclasses.replace(card, compute_precision="fp32")
        out[name + note] = build_encoder(card, device="cpu")
    return out


def features(encoder, tiles: np.ndarray, batch: int = 32) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([
            encoder.encode(torch.from_numpy(tiles[a : a + batch])).float().numpy() for a in range(0, len(tiles), batch)
        ])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def other_subsampling(encoder, tiles: np.ndarray, ref: np.ndarray, qualities: list[int]) -> dict[int, tuple[float, float]]:
    """Per quality: KB per tile and mean feature cosine of ``tiles`` coded with 4:2:0."""
    import simplejpeg

    out = {}
    for q in qualities:
        coded = [encode_jpeg(t, q, subsampling="420") for t in tiles]
        decoded = np.stack([simplejpeg.decode_jpeg(c) for c in coded])
        out[q] = (float(np.mean([len(c) for c in coded]) / 1e3), float(cosine(features(encoder, decoded), ref).mean()))
    return out


def load_image(spec: str) -> np.ndarray:
    """An RGB uint8 image: ``skimage:NAME`` (a scikit-image sample) or an image file."""
    if spec.startswith("skimage:"):
        import skimage.data

        image = getattr(skimage.data, spec.removeprefix("skimage:"))()
    else:
        from PIL import Image

        image = np.asarray(Image.open(spec).convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SystemExit(f"{spec}: not an RGB uint8 image ({image.shape}, {image.dtype})")
    return image


def crops(image: np.ndarray, tile: int, stride: int) -> np.ndarray:
    """Every ``tile`` px crop of ``image`` at ``stride`` [n, tile, tile, 3]."""
    h, w = image.shape[:2]
    return np.stack([image[y : y + tile, x : x + tile] for y in range(0, h - tile + 1, stride)
                     for x in range(0, w - tile + 1, stride)])


def store_round_trip(tiles: np.ndarray, codec: TileCodec) -> tuple[np.ndarray, float]:
    """``tiles`` coded by the store's chunk encoder and decoded as ``PatchStore.read_tiles`` does;
    and KB per tile of the chunk files."""
    import simplejpeg
    from numcodecs import VLenBytes

    out, size = np.empty_like(tiles), 0
    for a in range(0, len(tiles), CHUNK_TILES):
        chunk = tiles[a : a + CHUNK_TILES]
        data = codec.encode_chunk(chunk)
        size += len(data)
        if codec.name == "jpeg":
            for k, item in enumerate(VLenBytes().decode(data)[: len(chunk)]):
                out[a + k] = simplejpeg.decode_jpeg(item, colorspace="RGB")
        else:
            out[a : a + len(chunk)] = codec.decode_chunk(data, tiles.shape[1])[: len(chunk)]
    return out, size / len(tiles) / 1e3


def codec_ms(tiles: np.ndarray, encode, decode, rounds: int = 3) -> tuple[list[bytes], float, float]:
    """``tiles`` coded one by one with ``encode``; ms per tile to encode and to decode (best of
    ``rounds``, one thread)."""
    coded = [encode(t) for t in tiles]
    enc = dec = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for tile in tiles:
            encode(tile)
        enc = min(enc, (time.process_time() - t) / len(tiles) * 1e3)
        t = time.process_time()
        for c in coded:
            decode(c)
        dec = min(dec, (time.process_time() - t) / len(tiles) * 1e3)
    return coded, enc, dec


def jpegxl_rows(tiles: np.ndarray, nets: dict[str, object], refs: dict[str, np.ndarray], distances: list[float],
                qualities: list[int]) -> None:
    """JPEG XL (libjxl through imagecodecs, effort 1, one thread) at each Butteraugli
    ``distances`` beside the store's JPEG at ``qualities``: KB per tile, PSNR, feature cosine,
    and encode / decode ms per tile. A yardstick for the store's codec, not one it offers."""
    import imagecodecs
    import simplejpeg

    rows = [(f"jpeg q{q} 4:4:4", lambda t, q=q: encode_jpeg(t, q), lambda c: simplejpeg.decode_jpeg(c, colorspace="RGB"))
            for q in qualities]
    rows += [(f"jpeg xl d{d:g}", lambda t, d=d: imagecodecs.jpegxl_encode(t, distance=d, effort=1, numthreads=1),
              lambda c: imagecodecs.jpegxl_decode(c, numthreads=1)) for d in distances]
    print(f"\n{'codec':18s} {'KB/tile':>8s} {'PSNR dB':>8s} {'enc ms':>7s} {'dec ms':>7s}  "
          + "  ".join(f"{n[:24]:>24s}" for n in nets))
    for label, encode, decode in rows:
        coded, enc, dec = codec_ms(tiles, encode, decode)
        decoded = np.stack([decode(c) for c in coded])
        db, _ = psnr(decoded, tiles)
        cos = [cosine(features(net, decoded), refs[name]) for name, net in nets.items()]
        print(f"{label:18s} {np.mean([len(c) for c in coded]) / 1e3:8.1f} {db:8.2f} {enc:7.3f} {dec:7.3f}  "
              + "  ".join(f"{c.mean():.5f} / {c.min():.5f}" for c in cos))


def image_benchmark(spec: str, qualities: list[int], stride: int, downsample: int,
                    jpegxl: list[float] | None = None) -> None:
    """Sizes and fidelity of the store's codecs on crops of a real-tissue image (``--image``),
    shrunk ``downsample`` times first."""
    import simplejpeg

    from wsitools.slide import resize_rgb

    image = load_image(spec)
    if downsample > 1:
        image = resize_rgb(image, (image.shape[1] // downsample, image.shape[0] // downsample),
                           box=(0.0, 0.0, float(image.shape[1] // downsample * downsample),
                                float(image.shape[0] // downsample * downsample)))
    tiles = crops(image, 224, stride)
    print(f"{spec} (downsampled {downsample}x): {image.shape[1]} x {image.shape[0]} px, "
          f"{len(tiles)} crops of 224 px at a stride of {stride}")
    nets = encoders(CARDS[:2])
    refs = {name: features(net, tiles) for name, net in nets.items()}
    print(f"{'codec':18s} {'KB/tile':>8s} {'PSNR dB':>8s} {'worst':>6s}  " + "  ".join(f"{n[:24]:>24s}" for n in nets))
    rows = [("lossless", TileCodec("lossless"))] + [(f"jpeg q{q} 4:4:4", TileCodec("jpeg", q)) for q in qualities]
    for label, codec in rows:
        decoded, kb = store_round_trip(tiles, codec)
        db, worst = psnr(decoded, tiles)
        cos = [cosine(features(net, decoded), refs[name]) for name, net in nets.items()]
        print(f"{label:18s} {kb:8.1f} {db:8.2f} {worst:6.2f}  "
              + "  ".join(f"{c.mean():.5f} / {c.min():.5f}" for c in cos))
    for q in qualities:  # the subsampling the store does not use, for the record
        coded = [encode_jpeg(t, q, subsampling="420") for t in tiles]
        decoded = np.stack([simplejpeg.decode_jpeg(c) for c in coded])
        db, worst = psnr(decoded, tiles)
        cos = [cosine(features(net, decoded), refs[name]) for name, net in nets.items()]
        print(f"{f'jpeg q{q} 4:2:0':18s} {np.mean([len(c) for c in coded]) / 1e3:8.1f} {db:8.2f} {worst:6.2f}  "
              + "  ".join(f"{c.mean():.5f} / {c.min():.5f}" for c in cos))
    if jpegxl:
        jpegxl_rows(tiles, nets, refs, jpegxl, qualities)
    print("(cosine of features against the crops' own, mean / min; "
          "targets: <= 25 KB/tile, efficientnet-lite0 >= 0.995)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="20000x15000", help="level-0 WIDTHxHEIGHT of the synthetic slide")
    ap.add_argument("--pyramid", default="1,4,16", help="downsamples of the slide's levels")
    ap.add_argument("--slide", type=Path, default=None, help="reuse (or create) the slide at this path")
    ap.add_argument("--qualities", default="90,95,96,97", help="JPEG qualities to store with")
    ap.add_argument("--sample", type=int, default=256, help="tiles compared by PSNR and features")
    ap.add_argument("--vit-sample", type=int, default=48, help="of these, tiles through ViT-B/16 (slow on a CPU)")
    ap.add_argument("--image", default=None,
                    help="measure on crops of a real-tissue image instead (skimage:immunohistochemistry or a file)")
    ap.add_argument("--image-stride", type=int, default=24, help="stride of the image's 224 px crops")
    ap.add_argument("--image-downsample", type=int, default=1,
                    help="shrink the image this many times (area average) before cropping")
    ap.add_argument("--jpegxl", default=None, metavar="DISTANCES",
                    help="with --image: also JPEG XL at these Butteraugli distances (e.g. 0.3,0.5), as a yardstick")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.image:
        image_benchmark(args.image, [int(q) for q in args.qualities.split(",")], args.image_stride,
                        args.image_downsample, [float(d) for d in args.jpegxl.split(",")] if args.jpegxl else None)
        return
    width, height = (int(v) for v in args.size.lower().split("x"))
    pyramid = tuple(int(v) for v in args.pyramid.split(","))
    qualities = [int(q) for q in args.qualities.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_store_"))
    slide = args.slide or work / f"bench_{width}x{height}.svs"
    if not slide.exists():
        make_slide(slide, width, height, pyramid)
    base = TilingParams(mpp=0.5, tile_size=224)
    variants = {"lossless": dataclasses.replace(base, codec="lossless")}
    variants |= {f"jpeg q{q}": dataclasses.replace(base, codec="jpeg", jpeg_quality=q) for q in qualities}
    try:
        tile_slide(slide, work / "direct", dataclasses.replace(base, store_pixels=False), workers=1, progress=False)
        direct = PatchStore.open(work / "direct" / f"{slide.stem}.zarr")
        n = len(direct)
        sample = np.unique(np.linspace(0, n - 1, min(args.sample, n)).round().astype(int))
        reference = direct.read_tiles(sample)
        print(f"{n} tissue tiles of 224 px at 0.5 um/px, read from level {direct.attrs['level']} "
              f"(resize factor {direct.attrs['resize_factor']:g}); {len(sample)} sampled")
        rows: dict[str, dict[str, float]] = {}
        stores: dict[str, PatchStore] = {}
        for label, params in variants.items():
            t = time.perf_counter()
            tile_slide(slide, work / label.replace(" ", "_"), params, workers=1, progress=False)
            seconds = time.perf_counter() - t
            store = stores[label] = PatchStore.open(work / label.replace(" ", "_") / f"{slide.stem}.zarr")
            overall, worst = psnr(store.read_tiles(sample), reference)
            rows[label] = {
                "tile_rate": n / seconds,
                "kb_per_tile": tiles_bytes(store) / n / 1e3,
                "psnr": overall,
                "psnr_min": worst,
            }
        for label, ms in read_ms_per_tile(stores).items():
            rows[label]["read_ms"] = ms
        lossless_tiles = stores["lossless"].read_tiles(sample)
        vit_rows = sample[:: max(1, len(sample) // args.vit_sample)][: args.vit_sample]
        cos: dict[str, dict[str, tuple[float, float]]] = {label: {} for label in variants}
        for name, encoder in encoders(CARDS).items():
            rows_used = vit_rows if name.startswith("vitb16") else sample
            keep = np.isin(sample, rows_used)
            ref = features(encoder, lossless_tiles[keep])
            for label, store in stores.items():
                c = cosine(features(encoder, store.read_tiles(sample[keep])), ref)
                cos[label][f"{name} [{keep.sum()} tiles]"] = (float(c.mean()), float(c.min()))
            if name.startswith("efficientnet"):
                chroma = other_subsampling(encoder, lossless_tiles, ref, qualities)
                noisy = np.clip(lossless_tiles + np.random.default_rng(0).integers(-1, 2, lossless_tiles.shape), 0, 255)
                noise_cos = cosine(features(encoder, noisy.astype(np.uint8)), ref)
                noise_psnr = psnr(noisy.astype(np.uint8), lossless_tiles)[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)  # stores, and the slide unless --slide named it

    print(f"\nmachine: {platform.processor() or platform.machine()}; slide {width}x{height}, pyramid {args.pyramid}")
    print(f"{'store':10s} {'tiles/s':>8s} {'KB/tile':>8s} {'PSNR dB':>8s} {'worst tile':>11s} {'read ms/tile':>13s}")
    for label, r in rows.items():
        print(f"{label:10s} {r['tile_rate']:8.0f} {r['kb_per_tile']:8.1f} {r['psnr']:8.2f} "
              f"{r['psnr_min']:11.2f} {r['read_ms']:13.3f}")
    print("\ncosine of features against the lossless tiles' (mean / min over tiles):")
    for label, per_encoder in cos.items():
        for name, (mean, low) in per_encoder.items():
            print(f"  {label:10s} {name:60s} {mean:.5f} / {low:.5f}")
    print(f"\nthe same tiles coded with 4:2:0 instead of {JPEG_SUBSAMPLING} (KB/tile, efficientnet-lite0 cosine mean):")
    for q, (kb, c) in chroma.items():
        print(f"  q{q}: {kb:.1f} KB, cosine {c:.5f}")
    print(f"lossless tiles + uniform noise of +-1 grey level ({noise_psnr:.1f} dB): efficientnet-lite0 cosine "
          f"{noise_cos.mean():.5f} / {noise_cos.min():.5f}")
    lossless = rows["lossless"]
    print("\nratios against lossless (target: size <= 0.25 and <= 25 KB/tile; cosine >= 0.995):")
    for label, r in rows.items():
        if label != "lossless":
            print(f"  {label:10s} size {r['kb_per_tile'] / lossless['kb_per_tile']:.3f}  "
                  f"read cost {r['read_ms'] / lossless['read_ms']:.2f}x  tiling rate {r['tile_rate'] / lossless['tile_rate']:.2f}x")


if __name__ == "__main__":
    main()
