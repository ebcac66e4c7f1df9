"""Downloading checkpoints from the Hugging Face hub (huggingface_hub), and its errors in ours.

Only safetensors weights, configs and tokenizer files are fetched; downloads resume where they
stopped (huggingface_hub keeps partial blobs). ``HF_HUB_OFFLINE`` is respected: the local cache is
used, and nothing is fetched. Gated repositories need a token (``HF_TOKEN`` or ``hf auth login``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from localmed.errors import HubAccessError, OfflineError
from localmed.provenance import CHECKPOINT_FILES

DOWNLOAD_PATTERNS = ["*.safetensors", "*.safetensors.index.json", *CHECKPOINT_FILES]
"""What a checkpoint download fetches: safetensors weights and the files a conversion reads."""


def _progress_class():
    try:
        from tqdm import TqdmExperimentalWarning
        from tqdm.rich import tqdm as rich_tqdm
    except ImportError:  # pragma: no cover - tqdm comes with huggingface_hub
        return None
    warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)
    return rich_tqdm


def download_checkpoint(repo_id: str, *, revision: str | None = None, token: str | None = None,
                        gated: bool = False, patterns: list[str] | None = None
                        ) -> tuple[Path, str]:
    """Fetch (or find in the cache) a checkpoint; returns its folder and resolved commit.

    ``patterns``: only these files (``["config.json"]``: what a command checks before it
    downloads the weights); by default the weights and every file a conversion reads."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = constants.HF_HUB_OFFLINE
    kwargs = {}
    if (progress := _progress_class()) is not None:
        kwargs["tqdm_class"] = progress
    try:
        folder = snapshot_download(repo_id, revision=revision,
                                   allow_patterns=patterns or DOWNLOAD_PATTERNS, token=token,
                                   local_files_only=offline, **kwargs)
    except GatedRepoError:
        raise HubAccessError(
            repo_id, f"gated repository: accept its terms at https://huggingface.co/{repo_id}, "
            "then log in with `hf auth login` or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        hint = " (it is gated: log in with `hf auth login` or set HF_TOKEN)" if gated else \
            " (if it is private or gated, log in with `hf auth login` or set HF_TOKEN)"
        raise HubAccessError(repo_id, "repository not found" + hint) from None
    except RevisionNotFoundError:
        raise HubAccessError(repo_id, f"revision '{revision}' not found") from None
    except LocalEntryNotFoundError:
        if offline:
            raise OfflineError(repo_id, "not in the local Hugging Face cache and HF_HUB_OFFLINE "
                               "is set; copy the checkpoint folder here and pass its path") from None
        raise OfflineError(repo_id, "cannot reach the Hugging Face hub and it is not cached; "
                           "connect, or copy the checkpoint folder here and pass its path") from None
    except HfHubHTTPError as exc:
        raise HubAccessError(repo_id, f"hub error: {exc}".splitlines()[0]) from None
    path = Path(folder)
    return path, path.name
