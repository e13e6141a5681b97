"""`distill push RUN_DIR REPO_ID`: the curated training set (sft/) to the Hugging Face Hub.

Uploads the card and the data files (jsonl, parquet, prompt/completion, alpaca) as a dataset
repo, never the local `datasets` cache directory. The token comes from the HF_TOKEN environment
variable and is handed to `huggingface_hub` only: it is not printed, logged or written anywhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from distill.config import ConfigError
from distill.formats import FORMAT_FILES, read_card_metadata

TOKEN_ENV = "HF_TOKEN"
SFT_FILES = ("README.md", "sft.jsonl", *FORMAT_FILES.values())
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def push_sft(run_dir: Path, repo_id: str, *, private: bool = False, api: Any = None
             ) -> dict[str, Any]:
    """Create (or reuse) dataset repo `repo_id` and upload `run_dir/sft/`'s files in one commit.

    Returns {url, repo_id, files, rows, private}. Bad input (no sft set, bad repo id, no token)
    raises ConfigError before any request is made.
    """
    sft = Path(run_dir) / "sft"
    if not (sft / "sft.jsonl").is_file():
        raise ConfigError(f"{sft}: no training set (sft.jsonl); run the filter stage first")
    if not (sft / "README.md").is_file():
        raise ConfigError(f"{sft}: no dataset card (README.md); rerun the filter stage")
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise ConfigError(f"REPO_ID {repo_id!r}: expected owner/name")
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise ConfigError(f"{TOKEN_ENV}: environment variable not set (a Hub token with write "
                          "access, from https://huggingface.co/settings/tokens)")
    files = [f for f in SFT_FILES if (sft / f).is_file()]
    with open(sft / "sft.jsonl") as fh:
        rows = sum(1 for line in fh if line.strip())
    meta = read_card_metadata((sft / "README.md").read_text())
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    repo = api.create_repo(repo_id=repo_id, repo_type="dataset", private=private,
                           exist_ok=True, token=token)
    api.upload_folder(
        repo_id=repo_id, repo_type="dataset", folder_path=str(sft), allow_patterns=files,
        commit_message=f"distill: {rows} rows from pipeline {meta.get('pipeline', '?')}",
        token=token,
    )
    url = str(getattr(repo, "url", None) or f"https://huggingface.co/datasets/{repo_id}")
    return {"url": url, "repo_id": repo_id, "files": files, "rows": rows, "private": private}
