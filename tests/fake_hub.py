"""A stand-in for the Hub (`HfApi`) so that publishing is tested without a network."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants

from hms_segmentation import hub


class FakeHfApi:
    """Stands in for `HfApi`: records the repository and the commits, reading each file as it is committed."""

    instances: list[FakeHfApi] = []
    fail_with: Exception | None = None

    def __init__(self, token: str | None = None):
        self.token, self.repos, self.commits, self.staged_paths, self.branches = token, [], [], [], []
        FakeHfApi.instances.append(self)

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False, repo_type=None):
        self.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok})
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id: str, *, branch: str, exist_ok: bool = False, repo_type=None):
        self.branches.append(branch)

    def create_commit(self, repo_id: str, operations, *, commit_message: str, repo_type=None, revision=None):
        operations = list(operations)
        self.staged_paths = [Path(operation.path_or_fileobj) for operation in operations]
        if FakeHfApi.fail_with is not None:
            raise FakeHfApi.fail_with
        files = {operation.path_in_repo: Path(operation.path_or_fileobj).read_bytes() for operation in operations}
        self.commits.append({"repo_id": repo_id, "message": commit_message, "files": files, "revision": revision})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")


def install_fake_hub(monkeypatch) -> type[FakeHfApi]:
    """Route `hms_segmentation.hub` to `FakeHfApi`, online, with no logged-in token."""
    FakeHfApi.instances, FakeHfApi.fail_with = [], None
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return FakeHfApi
