"""``localmed pull``: a ready-made GGUF from a Hugging Face hub repository, into the library.

The file is chosen by quant among the repo's GGUFs (``Q4_K_M``, any case), fetched with
huggingface_hub (resumable; ``HF_TOKEN`` or ``hf auth login`` for gated repos; with
``HF_HUB_OFFLINE=1`` from the local cache only), checked against the hub's sha256 (the LFS
metadata online; offline, the cache's blob name, which is that digest), its header validated,
then placed in the models folder under a library name (``<id>.<QUANT>.gguf``; a split one's parts
as ``<id>.<QUANT>-00001-of-0000N.gguf``…, as llama.cpp loads them) with a manifest saying where
it came from: repo, commit, files, sha256 and ``converter: "<repo> (not made by localmed)"``.
Nothing stays placed unless all of that holds.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from localmed import library
from localmed.atomic import atomic_path
from localmed.errors import HubAccessError, LocalmedError, OfflineError
from localmed.provenance import Provenance, sha256_file
from localmed.quants import QUANT_TYPES
from localmed.registry import Registry

QUANT_IN_NAME = re.compile(
    r"(?<![A-Za-z0-9])(I?Q[1-8]_(?:K_[SML]|K_XL|K|[01]|XXS|XS|S|M|NL|L)|BF16|F16|F32)"
    r"(?![A-Za-z0-9])", re.IGNORECASE)
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PullError(LocalmedError):
    """A pull that cannot go on: no such quant, several matches, a bad file."""


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int
    sha256: str
    """The hub's sha256 of the file (LFS); empty where the hub gives none."""

    @property
    def whole(self) -> str:
        """The GGUF this file is, or (a split part) is part of."""
        return library.SPLIT_PART.sub(library.GGUF_SUFFIX, self.name)

    @property
    def quant(self) -> str:
        found = QUANT_IN_NAME.findall(Path(self.name).name)
        return found[-1].upper() if found else ""


def parse_spec(spec: str, registry: Registry | None = None) -> tuple[str, str | None, str]:
    """``owner/repo[:QUANT]`` or a registry ``ID[:QUANT]`` → (repo, QUANT or None, the id the
    library will know it by)."""
    name, _, quant = spec.partition(":")
    if registry is not None and name in registry:
        entry = registry[name]
        if not entry.gguf_repos:
            raise PullError(f"the registry names no GGUF repository for {name}: pull one by "
                            f"its name (localmed pull owner/name:QUANT), or make it with "
                            f"localmed quantize {name}")
        return entry.gguf_repos[0], (quant.upper() or entry.default_quant), entry.id
    if name.count("/") != 1 or not all(name.split("/")):
        raise PullError(f"'{spec}': give a hub repository as owner/name[:QUANT] "
                        "(e.g. bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M) or a registry id "
                        "with a GGUF repository")
    return name, (quant.upper() or None), model_id_for(name)


def _unreachable() -> tuple[type[BaseException], ...]:
    """What a failed connection to the hub raises: OSError, and the transport errors of
    huggingface_hub's HTTP library (httpx, or its httpx2 fork), which are not OSErrors."""
    from huggingface_hub.utils import get_session

    http = importlib.import_module(type(get_session()).__module__.partition(".")[0])
    return OSError, getattr(http, "TransportError", OSError)


def repo_files(repo: str, *, revision: str | None = None, token: str | None = None
               ) -> tuple[str, list[HubFile]]:
    """The repo's commit and its GGUF files, from the hub, or the cache when offline."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    unreachable = _unreachable()
    try:
        if constants.HF_HUB_OFFLINE:
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=["*.gguf"],
                                            local_files_only=True))
            files = []
            for path in sorted(folder.rglob("*.gguf")):
                blob = Path(os.path.realpath(path)).name
                files.append(HubFile(path.relative_to(folder).as_posix(), path.stat().st_size,
                                     blob if SHA256.match(blob) else ""))
            return folder.name, files
        info = HfApi().model_info(repo, revision=revision, files_metadata=True, token=token)
    except GatedRepoError:
        raise HubAccessError(repo, f"gated repository: accept its terms at "
                             f"https://huggingface.co/{repo}, then log in with `hf auth login` "
                             "or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubAccessError(repo, "repository not found (if it is private or gated, log in "
                             "with `hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubAccessError(repo, f"revision '{revision}' not found") from None
    except LocalEntryNotFoundError:
        raise OfflineError(repo, "no GGUF of it is in the local Hugging Face cache and "
                           "HF_HUB_OFFLINE is set") from None
    except HfHubHTTPError as exc:
        raise HubAccessError(repo, f"hub error: {exc}".splitlines()[0]) from None
    except unreachable as exc:  # no network: the connection refused or the name unresolved
        raise OfflineError(repo, f"cannot reach the Hugging Face hub ({exc}); connect, or set "
                           "HF_HUB_OFFLINE=1 to pull from the local cache") from None
    files = [HubFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else "")
             for s in info.siblings or [] if s.rfilename.endswith(".gguf")]
    return info.sha or "", files


def choose(repo: str, files: list[HubFile], quant: str | None) -> list[HubFile]:
    """The file (or the parts of a split file) of ``quant`` among the repo's GGUFs."""
    models = [f for f in files if "mmproj" not in f.name.lower()]
    if not models:
        raise PullError(f"{repo} has no GGUF file")
    has = sorted({f.quant or Path(f.name).name for f in models})
    if quant is None:
        if len({f.whole for f in models}) == 1:
            return _parts(repo, models)
        raise PullError(f"{repo} has several GGUFs: name one ({', '.join(has)}), e.g. "
                        f"localmed pull {repo}:{has[0]}")
    if quant not in QUANT_TYPES and not quant.startswith(("IQ", "Q")):
        raise PullError(f"'{quant}' is not a llama.cpp quant type")
    matches = [f for f in models if f.quant == quant]
    if not matches:
        raise PullError(f"{repo} has no {quant} GGUF; it has: {', '.join(has)}")
    if len({f.whole for f in matches}) > 1:
        raise PullError(f"{repo} has several {quant} GGUFs ("
                        f"{', '.join(sorted(f.name for f in matches))}); "
                        "pull one by its repository's other name or ask its maintainer")
    return _parts(repo, matches)


PROJECTOR_PREFERENCE = ("F16", "BF16", "Q8_0", "F32")
"""Which of a repository's vision projectors to take when none matches the model's quant:
F16 first, as llama.cpp's releases ship (the projector is small beside the model, and a
quantized vision tower reads images worse)."""


def choose_projector(files: list[HubFile], quant: str) -> HubFile | None:
    """An image-text repository's vision projector (``mmproj*.gguf``): the one of the model's
    quant if there is one, else by :data:`PROJECTOR_PREFERENCE`; None for a text model."""
    projectors = sorted((f for f in files if library.is_projector(Path(f.name))),
                        key=lambda f: f.name)
    if not projectors:
        return None
    for wanted in (quant, *PROJECTOR_PREFERENCE):
        for found in projectors:
            if found.quant == wanted:
                return found
    return projectors[0]


def _parts(repo: str, files: list[HubFile]) -> list[HubFile]:
    files = sorted(files, key=lambda f: f.name)
    splits = [library.SPLIT_PART.search(f.name) for f in files]
    if len(files) == 1 and not splits[0]:
        return files
    counts = {int(m.group(2)) for m in splits if m}
    numbers = [int(m.group(1)) for m in splits if m]
    if None in splits or len(counts) != 1 or numbers != list(range(1, len(files) + 1)) \
            or counts != {len(files)}:
        raise PullError(f"{repo}: the parts of {files[0].name} are not complete "
                        f"({', '.join(f.name for f in files)})")
    return files


def model_id_for(repo: str) -> str:
    """The library id of a pulled repo: its name, without the ``-GGUF`` suffix, lowercased."""
    name = repo.split("/")[1]
    return re.sub(r"[-_.]gguf$", "", name, flags=re.IGNORECASE).lower()


def pull(spec: str, *, revision: str | None = None, token: str | None = None,
         folder: Path | None = None, registry: Registry | None = None
         ) -> tuple[Path, Provenance]:
    """Fetch, check and place one GGUF; returns where it is and its provenance."""
    from huggingface_hub import constants, hf_hub_download

    from localmed.formats.gguf import read_gguf_info

    repo, quant, model_id = parse_spec(spec, registry)
    commit, files = repo_files(repo, revision=revision, token=token)
    chosen = choose(repo, files, quant)
    projector = choose_projector(files, chosen[0].quant)
    unreachable = _unreachable()
    local, digests = [], {}
    for part in [*chosen, *([projector] if projector else [])]:
        # every part fetched and checked before anything is placed
        try:
            path = Path(hf_hub_download(repo, part.name, revision=commit or revision,
                                        token=token, local_files_only=constants.HF_HUB_OFFLINE))
        except unreachable as exc:
            raise OfflineError(repo, f"download of {part.name} failed: {exc}") from None
        digest = sha256_file(path)
        if part.sha256 and digest != part.sha256:
            raise PullError(f"{repo}/{part.name}: sha256 {digest[:16]}… differs from the hub's "
                            f"{part.sha256[:16]}…; the download is damaged (delete it from the "
                            "Hugging Face cache and pull again)")
        local.append(path)
        digests[part.name] = digest
    projector_file = local.pop() if projector else None
    # the header (with every part of a split one) validated before anything is placed
    info = read_gguf_info(local[0])
    if projector_file is not None:
        from localmed.projector import check_pair, model_width, read_projector

        check_pair(read_projector(projector_file), local[0], model_width(local[0]))
    label = chosen[0].quant or info.quant
    count = len(chosen)
    targets = [library.gguf_path(model_id, label, folder)] if count == 1 else \
        [library.split_name(model_id, label, n, count, folder) for n in range(1, count + 1)]
    for target in targets:
        if target.exists():
            raise PullError(f"{target} is already in the library; remove it (and its "
                            "manifest) to pull it again")
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    manifest = library.manifest_path(targets[0])
    placed: list[Path] = []
    record: dict[str, object] = {}
    try:
        for source, target in zip(local, targets, strict=True):
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
            placed.append(target)
        if projector is not None and projector_file is not None:
            beside = library.projector_path(model_id, projector.quant or "F16", folder)
            if not beside.exists() or sha256_file(beside) != digests[projector.name]:
                with atomic_path(beside) as tmp:  # another quant's pull may have placed it
                    shutil.copyfile(projector_file, tmp)
                placed.append(beside)
            record["projector"] = {"file": beside.name, "bytes": beside.stat().st_size,
                                   "sha256": digests[projector.name],
                                   "quant": projector.quant or "F16", "from": projector.name}
        provenance = Provenance(source=repo, revision=commit, quant=label, model_id=model_id,
                                inputs_sha256=digests,
                                converter=f"{repo} (not made by localmed)")
        with atomic_path(manifest) as tmp:
            tmp.write_text(json.dumps({**provenance.to_manifest(),
                                       "files": [p.name for p in chosen],
                                       "size": sum(p.stat().st_size for p in targets),
                                       **record},
                                      indent=1))
    except BaseException:
        for target in placed:
            target.unlink(missing_ok=True)
        raise
    return targets[0], provenance
