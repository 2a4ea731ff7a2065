"""Upload an exported folder to the Hugging Face Hub (`HfApi.create_repo` + `upload_folder`)."""

from __future__ import annotations

from pathlib import Path

from diffalign.backbones.base import hub_offline


class HubError(RuntimeError):
    """The Hub cannot be reached or refused the upload; the message names the repo."""


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create `repo_id` (if needed) and upload `folder` to it; returns the repo URL.

    Raises:
        HubError: offline (`HF_HUB_OFFLINE=1`), not logged in, or the upload failed — one line naming `repo_id`.
    """
    if hub_offline():
        raise HubError(f"cannot push to the Hub repo '{repo_id}': HF_HUB_OFFLINE is set; unset it (and log in with "
                       "`hf auth login`) or upload the folder later")  # fmt: skip
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload with diffalign export")
    except Exception as err:  # network, auth and permission errors all become one line naming the repo
        raise HubError(f"cannot push '{folder}' to the Hub repo '{repo_id}': {type(err).__name__}: {err}") from err
    return str(url)
