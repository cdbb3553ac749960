"""Downloading a card's weight files (``wsitools encoders fetch NAME``).

Each file with a ``url`` is streamed to a temporary name beside its final place, its sha256 is
computed while it streams, and it is renamed into place only if the checksum matches the card
(a card without a pinned sha256 gets the file plus a warning saying which checksum to pin).
Any URL scheme urllib knows works, ``file://`` included (that is how the tests run offline).

Hugging Face hub files are ``https://huggingface.co/OWNER/REPO/resolve/REVISION/FILE`` URLs. For
those (and only those) the token in ``HF_TOKEN`` goes along as a bearer token, never to the host a
download is redirected to; a gated model answers 401 or 403 without an accepted-terms token, which
becomes one line saying where to accept the terms. Nothing is downloaded except by ``fetch``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from wsitools.encoders.cards import EncoderCard, WeightFile, weight_sha256
from wsitools.errors import ModelError
from wsitools.io import atomic_path

log = logging.getLogger(__name__)

FetchStatus = Literal["present", "downloaded", "packaged", "no_url"]


@dataclass(frozen=True)
class FetchResult:
    """What happened to one weight file."""

    weight: WeightFile
    status: FetchStatus
    sha256: str | None


HF_HOST = "huggingface.co"
HF_TOKEN_ENV = "HF_TOKEN"
_HF_RESOLVE = re.compile(r"https://huggingface\.co/([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)/resolve/.+")


def hub_repo(url: str) -> str | None:
    """``OWNER/REPO`` of a Hugging Face hub file URL, else None."""
    match = _HF_RESOLVE.fullmatch(url)
    return match.group(1) if match else None


def download_request(url: str) -> urllib.request.Request:
    """The request for ``url``: with ``Authorization: Bearer $HF_TOKEN`` for a Hugging Face hub
    file when the variable is set, as an unredirected header (it is not sent on to the storage
    host the hub redirects to)."""
    request = urllib.request.Request(url)
    token = os.environ.get(HF_TOKEN_ENV, "").strip()
    if token and hub_repo(url) is not None:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    return request


def _http_failure(url: str, exc: urllib.error.HTTPError) -> str:
    repo = hub_repo(url)
    if repo is not None and exc.code in (401, 403):
        has_token = bool(os.environ.get(HF_TOKEN_ENV, "").strip())
        how = (
            f"the token in {HF_TOKEN_ENV} was refused: its account has not been granted access"
            if has_token
            else f"set {HF_TOKEN_ENV} to a Hugging Face access token"
        )
        return (
            f"{url}: download refused (HTTP {exc.code}): {repo} is gated; accept its terms at "
            f"https://{HF_HOST}/{repo} with your account, then {how}"
        )
    return f"{url}: download failed (HTTP {exc.code} {exc.reason})"


def _download(url: str, dest: Path, *, timeout: float) -> str:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(download_request(url), timeout=timeout) as response, open(dest, "wb") as out:
            while block := response.read(1 << 20):
                digest.update(block)
                out.write(block)
    except urllib.error.HTTPError as exc:
        raise ModelError(_http_failure(url, exc)) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ModelError(f"{url}: download failed ({exc})") from None
    return digest.hexdigest()


def _check_destination(card: EncoderCard, weight: WeightFile) -> None:
    """Refuse to download to a place outside the card's folder: a card from elsewhere whose
    ``file`` is absolute or climbs out with ``..`` must not make ``fetch`` write over another
    file. (Such a card still loads a file that is already there.) The check is on the
    names, so a symbolic link beside the card may lead to another disk. A folder where the file
    goes is refused too, before the download."""
    folder = Path(os.path.normpath(card.source.parent if card.source else Path.cwd()))
    target = Path(os.path.normpath(weight.path))  # by name: a link beside the card may lead anywhere
    if not target.is_relative_to(folder) or target == folder:
        raise ModelError(
            f"{card.source}: weight file {weight.file!r} is outside the card's folder {folder}; fetch "
            "writes only beside the card (name the file relative to it, or download it by hand)"
        )
    if weight.path.is_dir():
        raise ModelError(
            f"{weight.path}: is a folder, where the card {card.source} puts its weight file {weight.file!r}; "
            "move the folder away or name another file in the card"
        )


def fetch_weight(card: EncoderCard, weight: WeightFile, *, force: bool = False, timeout: float = 60.0) -> FetchResult:
    """Make one weight file of ``card`` present and verified; see the module docstring."""
    if weight.package:
        return FetchResult(weight, "packaged", None)
    if weight.path.is_file() and not force:
        digest = weight_sha256(weight.path)
        if weight.sha256 is None or digest == weight.sha256:
            return FetchResult(weight, "present", digest)
        log.warning("%s: checksum differs from the card, downloading again", weight.path)
    if not weight.url:
        if weight.path.is_file():
            return FetchResult(weight, "present", weight_sha256(weight.path))
        return FetchResult(weight, "no_url", None)
    _check_destination(card, weight)
    with atomic_path(weight.path, overwrite=True) as tmp:
        digest = _download(weight.url, tmp, timeout=timeout)
        if weight.sha256 and digest != weight.sha256:
            raise ModelError(
                f"{weight.url}: downloaded file has sha256 {digest}, the card {card.source} "
                f"expects {weight.sha256}; nothing was written to {weight.path}"
            )
    if not weight.sha256:
        log.warning(
            "%s: the card %s pins no sha256; this download has sha256 %s (add it to the card)",
            weight.path,
            card.source,
            digest,
        )
    return FetchResult(weight, "downloaded", digest)


def fetch_card(card: EncoderCard, *, force: bool = False, timeout: float = 60.0) -> list[FetchResult]:
    """Fetch every weight file of ``card``; a file without a URL that is absent is an error."""
    results = [fetch_weight(card, w, force=force, timeout=timeout) for w in card.weights]
    missing = [r.weight.path for r in results if r.status == "no_url"]
    if missing:
        raise ModelError(
            f"{card.source}: no download URL for {', '.join(map(str, missing))}; place the file(s) there by hand"
        )
    return results
