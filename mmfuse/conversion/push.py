"""`mmfuse push DIR --repo-id NAME`: upload an mmfuse folder to the Hugging Face Hub in one commit.

The upload contains the safetensors weights (re-sharded when a file is larger than
`--max-shard-size`), config.json with the Hub code it names, the processor files, the pipeline
file and a model card (README.md, generated when the folder has none). All files go into a
single commit, so a failed upload leaves the repository as it was.

The token comes from where `huggingface_hub` looks for it (`HF_TOKEN`, then the file written by
`hf auth login`). It is sent only in request headers, and mmfuse never prints or logs it.
"""

import json
import os
import tempfile

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.serialization import save_torch_state_dict
from huggingface_hub.serialization._base import parse_size_to_int
from transformers import AutoConfig
from transformers.utils import logging

from ..cli import CommandError
from .model_card import build_model_card

logger = logging.get_logger(__name__)

# transformers 4.57's save_pretrained shards at 5GB by default (5.25 at 50GB). Smaller files are
# quicker to resume after a failed download.
DEFAULT_MAX_SHARD_SIZE = "5GB"
SKIPPED_NAMES = {".git", ".cache", "__pycache__", ".gitattributes"}


def add_arguments(parser):
    parser.add_argument("folder", metavar="DIR", help="mmfuse model folder, as written by compose or convert.")
    parser.add_argument("--repo-id", required=True, help="Hub repository to push to, `user/name` or `org/name`.")
    add_upload_arguments(parser)


def add_upload_arguments(parser):
    """Add the upload options of `push`: visibility, branch, pull request, message and shard size."""
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--revision", default=None, help="Branch to commit to; created from main if missing.")
    parser.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
    parser.add_argument("--commit-message", default=None, help="Commit message (default: 'Upload <model type>').")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"Largest safetensors file to upload, e.g. 500MB; larger weights are split (default {DEFAULT_MAX_SHARD_SIZE}).",
    )


def run(args) -> int:
    commit = push_to_hub(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        max_shard_size=args.max_shard_size,
    )
    print(f"Pushed {args.folder} to {args.repo_id}: {commit.pr_url or commit.commit_url}")
    return 0


def push_to_hub(
    folder: str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    sources: list | None = None,
    token: str | None = None,
):
    """Upload `folder` to the Hub repository `repo_id` in one commit and return its `CommitInfo`.

    Args:
        sources: `SourceInfo` of the backbones, for the licence fields of a generated model card.
        token: defaults to the token `huggingface_hub` finds (`HF_TOKEN`, `hf auth login`).

    Raises:
        CommandError: the folder is not an mmfuse folder, no token is found, or the Hub
            rejected a request; nothing is committed in that case.
    """
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CommandError(
            f"{folder} has no config.json; push a folder written by `mmfuse compose` or `mmfuse convert`."
        )
    token = token or get_token()
    if token is None:
        raise CommandError("no Hugging Face token found; set HF_TOKEN or run `hf auth login`, then push again.")
    try:
        max_shard_bytes = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    except ValueError as error:
        raise CommandError(
            f"--max-shard-size {max_shard_size!r} is invalid ({error}); use a size such as 500MB or 5GB."
        ) from error

    config = AutoConfig.from_pretrained(folder)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="mmfuse-push-") as scratch:
        operations = upload_operations(folder, scratch, max_shard_bytes)
        if not any(operation.path_in_repo == "README.md" for operation in operations):
            card = build_model_card(config, repo_id=repo_id, sources=sources)
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
        logger.info("Uploading %d files from %s to %s", len(operations), folder, repo_id)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.create_commit(
                repo_id,
                operations=operations,
                commit_message=commit_message or f"Upload {config.model_type} model",
                revision=revision,
                create_pr=create_pr,
            )
        except (HfHubHTTPError, RuntimeError) as error:
            cause = error.__cause__ if isinstance(error, RuntimeError) and error.__cause__ else error
            first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise CommandError(
                f"upload of {folder} to {repo_id} failed ({first_line}); no commit was made, run the same push again."
            ) from error


def upload_operations(folder: str, scratch: str, max_shard_bytes: int) -> list:
    """List one `CommitOperationAdd` per file to upload, re-sharding weights above `max_shard_bytes`."""
    files = []
    for root, directories, names in os.walk(folder):
        directories[:] = sorted(name for name in directories if name not in SKIPPED_NAMES)
        files.extend(os.path.join(root, name) for name in sorted(names) if name not in SKIPPED_NAMES)
    weight_files = [path for path in files if path.endswith(".safetensors")]
    if weight_files and max(os.path.getsize(path) for path in weight_files) > max_shard_bytes:
        index_path = os.path.join(folder, "model.safetensors.index.json")
        files = [path for path in files if path not in weight_files and path != index_path]
        files.extend(reshard_weights(weight_files, scratch, max_shard_bytes))
        folder_of = {path: scratch for path in files if path.startswith(scratch)}
    else:
        folder_of = {}
    return [
        CommitOperationAdd(
            path_in_repo=os.path.relpath(path, folder_of.get(path, folder)).replace(os.sep, "/"),
            path_or_fileobj=path,
        )
        for path in files
    ]


def reshard_weights(weight_files: list, scratch: str, max_shard_bytes: int) -> list:
    """Rewrite the tensors of `weight_files` as shards of at most `max_shard_bytes` plus an index."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state_dict = {}
    metadata = {"format": "pt"}
    for path in weight_files:
        with safe_open(path, framework="pt") as handle:
            metadata.update(handle.metadata() or {})
        state_dict.update(load_file(path))
    save_torch_state_dict(state_dict, scratch, max_shard_size=max_shard_bytes, metadata=metadata)
    written = sorted(os.listdir(scratch))
    logger.info("Re-sharded %d weight files into %s", len(weight_files), json.dumps(written))
    return [os.path.join(scratch, name) for name in written]
