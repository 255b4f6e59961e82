"""The one way this project loads anything named by a Hugging Face hub id or a URL, so that a machine without
network fails in a second with one line instead of after minutes of retries.

Every ``from_pretrained`` of the project goes through `from_pretrained` here, and every checkpoint URL through
`require_url` before it is downloaded:

* a local folder or file is passed straight through (the hub is never asked about it);
* a name that can only be a path (absolute, ``./``, ``../``, ``~``, two or more ``/``, a file suffix, or any other
  name the hub would refuse as a model id) but does not exist is a `MissingLocalPath`, never a hub request;
* with ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) only the local hub cache is used;
* otherwise one short probe (a HEAD request to the hub endpoint, ``HF_ENDPOINT``, with huggingface_hub's own
  HTTP client, so the proxy variables apply as they would to the download) says whether the hub can be reached,
  once per process. If it cannot, a cached copy is used when there is one, else `HubUnavailableError` names the
  model and the config key and suggests ``HF_HUB_OFFLINE=1`` or a local folder.

Without the probe, huggingface_hub retries each file with back-off (~30 s a file), so loading BERT's tokenizer
alone took minutes. Imports nothing of the project, so models/, metrics/ and the entry points can all use it.
"""
from __future__ import annotations

import functools
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger("smile_blip")

# Long enough for a slow but working connection to answer a HEAD, short enough that a dead network costs little.
PROBE_TIMEOUT_S = 5.0
DEFAULT_ENDPOINT = "https://huggingface.co"
# Suffixes that make a name a file, never a hub repository (a hub id such as "gpt2" or "owner/name" has none).
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".txt", ".json", ".yaml", ".yml", ".model")
HINT = ("set HF_HUB_OFFLINE=1 to use only the local hub cache (after fetching the model once on a machine with "
        "network), or give a local folder")


class HubError(RuntimeError):
    """Something named by the user that this machine cannot load; the message names it and the config key.

    The entry points print it as one line with exit status 2. Not an OSError or ValueError on purpose: those are
    what loaders catch to try the next way of loading, and this must reach the user unchanged.
    """


class HubUnavailableError(HubError):
    """A hub id or URL that is not cached and cannot be fetched (no network, or HF_HUB_OFFLINE set)."""


class MissingLocalPath(HubError, FileNotFoundError):
    """A name that can only be a local path, and nothing is there. Also a FileNotFoundError: a loader that tries
    several ways (metrics' load_from_source) wraps it in its own message, as any missing file."""


def is_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as huggingface_hub reads them, re-read now (tests set them late)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def could_be_hub_id(source: str | Path) -> bool:
    """Whether the hub would accept ``source`` as a model id (``gpt2``, ``owner/name``: huggingface_hub's own
    ``validate_repo_id``) and it has no file suffix."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(source)
    if Path(text).suffix.lower() in FILE_SUFFIXES:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def must_be_local(source: str | Path) -> bool:
    """True when ``source`` can only mean a local path: absolute, ``./``/``../``/``~``-relative, two or more ``/``,
    a backslash, a space, a file suffix: anything the hub would refuse as a model id (`could_be_hub_id`).
    ``gpt2``, ``bert-base-uncased`` and ``owner/name`` are hub ids unless they exist on disk."""
    return not could_be_hub_id(source)


def is_url(source: str | Path) -> bool:
    return str(source).startswith(("http://", "https://"))


def is_hub_id(source: str | Path) -> bool:
    """A name that would be looked up on the hub: not an existing path, not a URL, not path-shaped."""
    text = str(source)
    return bool(text) and not is_url(text) and not must_be_local(text) and not Path(text).expanduser().exists()


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """The hub cache huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:
        home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        return Path(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub")))


def is_cached(repo_id: str) -> bool:
    """Whether the hub cache holds a snapshot of model ``repo_id`` (maybe not every file; loading then says so)."""
    snapshots = cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


@functools.lru_cache(maxsize=None)
def _probe_hub(url: str, timeout: float) -> str | None:
    """None when ``url`` answers, else why not. Cached: one probe per process, not one per file or model."""
    try:
        from huggingface_hub import get_session

        response = get_session().head(url, timeout=timeout)
    except Exception as error:  # requests or httpx, connect/proxy/timeout/TLS: every failure means "cannot reach"
        return f"{type(error).__name__}: {error}"
    if response.status_code >= 500:
        return f"HTTP {response.status_code}"
    return None


@functools.lru_cache(maxsize=None)
def _probe_url(origin: str, timeout: float) -> str | None:
    """As `_probe_hub`, with urllib, which torch.hub's download uses (the same proxy variables apply)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(origin, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError as error:  # the server answered: it is reachable
        return None if error.code < 500 else f"HTTP {error.code}"
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def hub_unreachable_reason() -> str | None:
    """None when the hub endpoint answers a HEAD within PROBE_TIMEOUT_S, else the reason (one try per process)."""
    return _probe_hub(endpoint(), PROBE_TIMEOUT_S)


def _missing_local(source: str, what: str) -> MissingLocalPath:
    return MissingLocalPath(f"{what} {source!r} not found: no such file or directory ({Path(source).absolute()}), "
                            "and not a hub id")


def resolve(source: str | Path, what: str) -> dict[str, Any]:
    """The extra ``from_pretrained`` keywords for loading ``source`` (``{}``, or ``{"local_files_only": True}``),
    or a `HubError` naming ``what`` (e.g. ``"model.tokenizer"``) when it cannot be loaded here.

    Call it before expensive work to fail early; `from_pretrained` calls it again (the probe is not repeated).
    """
    text = str(source)
    if Path(text).expanduser().exists():
        return {}
    if must_be_local(text):
        raise _missing_local(text, what)
    if is_offline():
        if is_cached(text):
            return {"local_files_only": True}
        raise HubUnavailableError(
            f"{what} {text!r} is a hub id, HF_HUB_OFFLINE is set and the hub cache ({cache_dir()}) has no copy of it; "
            "fetch it once on a machine with network (or unset HF_HUB_OFFLINE), or give a local folder")
    reason = hub_unreachable_reason()
    if reason is None:
        return {}
    if is_cached(text):
        _warn_once(f"the hub ({endpoint()}) cannot be reached ({reason}): loading {what} {text!r} from the local "
                   f"cache {cache_dir()}; set HF_HUB_OFFLINE=1 to skip the check")
        return {"local_files_only": True}
    raise HubUnavailableError(
        f"{what} {text!r} must come from the Hugging Face hub, which cannot be reached from this machine "
        f"({endpoint()}: {reason}), and the hub cache ({cache_dir()}) has no copy of it; {HINT}")


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def from_pretrained(loader: Callable[..., Any], source: str | Path, what: str, **kwargs) -> Any:
    """``loader(source, **kwargs)`` (a transformers ``from_pretrained``) after `resolve`; a cache-only load that
    finds files missing from the cache is a `HubUnavailableError` too, not transformers' traceback."""
    extra = resolve(source, what)
    try:
        return loader(str(source), **extra, **kwargs)
    except OSError as error:
        if not extra.get("local_files_only"):
            raise
        raise HubUnavailableError(
            f"{what} {str(source)!r}: the hub cannot be used (HF_HUB_OFFLINE is set, or it is unreachable) and its "
            f"cached copy is incomplete ({' '.join(str(error).split())[:300]}); fetch it once on a machine with "
            "network, or give a local folder") from error


def require_url(url: str, what: str, cached: bool) -> None:
    """Before downloading ``url`` (not yet in the cache, ``cached`` False): fail at once with one line naming
    ``what`` if HF_HUB_OFFLINE is set or the URL's host cannot be reached, instead of hanging or retrying."""
    if cached:
        return
    hint = f"download it by hand where there is network and set {what} to the local file"
    if is_offline():
        raise HubUnavailableError(f"{what} {url} is not downloaded yet (not in the cache) and HF_HUB_OFFLINE is "
                                  f"set; {hint}")
    parts = urllib.parse.urlsplit(url)
    reason = _probe_url(f"{parts.scheme}://{parts.netloc}/", PROBE_TIMEOUT_S)
    if reason is not None:
        raise HubUnavailableError(f"{what} {url} cannot be downloaded: {parts.netloc} cannot be reached from this "
                                  f"machine ({reason}); {hint}")


def check_sources(sources) -> None:
    """Early check of ``(what, source)`` pairs naming models, before anything is built: first every path-shaped
    name must exist (no network), then every hub id must be loadable (cached, or the hub reachable: one probe).
    None, config dicts (random toy parts) and URLs (see `require_url`) are skipped."""
    named = [(what, str(source)) for what, source in sources
             if source is not None and not isinstance(source, dict) and not is_url(source)]
    for what, source in named:
        if must_be_local(source) and not Path(source).expanduser().exists():
            raise _missing_local(source, what)
    for what, source in named:
        resolve(source, what)
