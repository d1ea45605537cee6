"""The Hugging Face Hub, through huggingface_hub: files land in its cache (HF_HOME, HF_HUB_CACHE), which transformers
and every other Hub tool share, so a model or dataset already there is not downloaded again. Its settings apply as
they do everywhere: HF_TOKEN or `hf auth login` for gated and private repositories, HF_ENDPOINT for a mirror,
HF_HUB_OFFLINE=1 to use the cache alone.

Every dataset on the Hub has an automatic parquet export on its `refs/convert/parquet` branch, one directory per
subset and split (`partial-<split>` where only the first part of a large split was converted); the task datasets are
read from there, as nanochat reads them through `datasets`, without that library.
"""
import os
import re

import httpx2
from huggingface_hub import constants, get_cached_repo_tree, is_offline_mode, snapshot_download
from huggingface_hub.errors import (CachedRepoTreeNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from jaxchat.common import UserError

PARQUET_REVISION = "refs/convert/parquet"


def check_repo_name(repo):
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or ".." in repo:
        raise UserError(f"--repo {repo!r}: expected owner/name")


def snapshot(repo, revision, patterns, repo_type="model"):
    """The cache directory of `repo` at `revision` (huggingface_hub's snapshots/<commit>) holding its files that match
    `patterns`, which huggingface_hub downloads unless they are cached; a branch or tag is resolved on the Hub (one
    request) unless offline. One UserError where it cannot."""
    what = f"{repo_type} {repo} at {revision!r}"
    try:
        return snapshot_download(repo, repo_type=repo_type, revision=revision, allow_patterns=patterns)
    except RevisionNotFoundError:
        raise UserError(f"{what}: no such revision on {constants.ENDPOINT}") from None
    except RepositoryNotFoundError:  # the Hub answers 401 or 404 alike for a repository one may not see
        raise UserError(f"{what}: not found on {constants.ENDPOINT} (is the name right? a gated or private "
                        f"repository needs `hf auth login` or HF_TOKEN)") from None
    except LocalEntryNotFoundError as e:  # offline or unreachable, and not (completely) in the cache
        why = "HF_HUB_OFFLINE is set" if is_offline_mode() else \
            f"{constants.ENDPOINT} cannot be reached ({_cause(e)})"
        raise UserError(f"{what} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and {why}") from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:
        raise UserError(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def cached_snapshot(repo, revision, patterns, repo_type="model"):
    """`snapshot`, with no request at all where the cache already holds every file that matches `patterns` (for a
    branch: at the commit the cache last saw it at). None where it does not."""
    try:
        return snapshot_download(repo, repo_type=repo_type, revision=revision, allow_patterns=patterns,
                                 local_files_only=True)
    except LocalEntryNotFoundError:  # includes a snapshot its cached file list shows incomplete
        return None


def download(repo, revision, patterns, what, repo_type="model"):
    """`snapshot`, saying what it downloads (huggingface_hub's progress bars show on a terminal only)."""
    if not is_offline_mode():
        print(f"downloading {what} from {constants.ENDPOINT} into {constants.HF_HUB_CACHE}")
    return snapshot(repo, revision, patterns, repo_type)


def repo_files(repo, commit, directory, repo_type="model"):
    """The names of every file of `repo` at `commit`, from the file list huggingface_hub keeps in its cache beside a
    snapshot (no request); for a snapshot an older huggingface_hub downloaded, which kept none, the files in it."""
    try:
        return [f.path for f in get_cached_repo_tree(repo, repo_type=repo_type, revision=commit)]
    except CachedRepoTreeNotFoundError:
        return [os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
                for root, _, names in os.walk(directory) for name in names]


def dataset_parquet_files(repo, subset, split):
    """The parquet files of `subset`/`split` of a Hub dataset (its automatic parquet export), in order; from the
    cache when it holds them, without a request."""
    patterns = [f"{subset}/{split}/*.parquet", f"{subset}/partial-{split}/*.parquet"]
    directory = cached_snapshot(repo, PARQUET_REVISION, patterns, "dataset") or \
        download(repo, PARQUET_REVISION, patterns, f"{repo} ({subset}/{split})", "dataset")
    files = sorted(os.path.join(directory, subset, part, name) for part in (split, f"partial-{split}")
                   if os.path.isdir(os.path.join(directory, subset, part))
                   for name in os.listdir(os.path.join(directory, subset, part)) if name.endswith(".parquet"))
    if not files:
        raise UserError(f"dataset {repo} has no parquet files for {subset}/{split} on its {PARQUET_REVISION} branch")
    return files


def _cause(error):
    cause = error.__cause__ or error
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
