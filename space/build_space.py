"""Build a self-contained Hugging Face Space folder for the HMSA demo, and optionally push it.

    python space/build_space.py build/space                              # app.py, README.md, requirements.txt, package
    python space/build_space.py build/space --model hms_quickstart/model # ... plus a bundled default model
    python space/build_space.py build/space --push USER/SPACE            # ... then create/update the Space

The folder holds `app.py` and `README.md` (copied from `space/`), the `hms_segmentation` source tree next to
`app.py` (a Space runs `python app.py`, so the app's folder comes first on `sys.path` and the vendored copy is what
gets imported; nothing is installed from a URL), and a `requirements.txt` generated from `pyproject.toml`
(`[project.dependencies]` plus the `space` extra), each package pinned to the version installed here, with torch
taken from the CPU wheel index. `--model PATH` copies a `save_pretrained` folder into `model/` and records it in
`default_model.txt`, which `app.py` reads as its default (`HMS_SPACE_MODEL` still wins); `--model ID` records a Hub
id or preset name there instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import HFValidationError, validate_repo_id
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

SPACE_DIR = Path(__file__).resolve().parent
REPO_ROOT = SPACE_DIR.parent
PACKAGE = "hms_segmentation"
SPACE_EXTRA = "space"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
COPIED_FILES = ("app.py", "README.md")
MODEL_DIR = "model"
# Read by app.py (`bundled_default_model`); the two names must agree.
DEFAULT_MODEL_FILE = "default_model.txt"
# Everything the builder writes at the top of OUTPUT_DIR: --overwrite replaces these, and only these.
BUILT_ENTRIES = (*COPIED_FILES, "requirements.txt", "LICENSE", PACKAGE, MODEL_DIR, DEFAULT_MODEL_FILE)
# Remote paths a push replaces, so that a file left from an earlier push (an old model) cannot linger on the Space.
REMOTE_BUILT_PATTERNS = [f"{PACKAGE}/*", f"{MODEL_DIR}/*", DEFAULT_MODEL_FILE]
NEVER_PINNED = ("torchvision",)  # the Space's image stays small; nothing in the package needs it
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SOURCE_JUNK = ("__pycache__", "*.pyc", "*.pyo")

REQUIREMENTS_HEADER = f"""\
# Third-party packages of the Space (Gradio SDK, CPU hardware), written by space/build_space.py from pyproject.toml
# ([project.dependencies] and the `{SPACE_EXTRA}` extra), each pinned to the version installed where it ran; gradio
# matches `sdk_version` in README.md. The {PACKAGE} package itself is not installed from here:
# space/build_space.py vendors its source next to app.py, where `python app.py` imports it.
# The CPU wheel of torch keeps the image small (no CUDA libraries); nothing here pulls torchvision.
--extra-index-url {TORCH_CPU_INDEX}
"""


class SpaceBuildError(Exception):
    """A bundle that cannot be built or pushed; the message names the file or argument and what to change."""


# ---------------------------------------------------------------------------------------------------------------------
# requirements.txt
# ---------------------------------------------------------------------------------------------------------------------


def space_header(readme: Path) -> dict[str, str]:
    """The `key: value` lines of the YAML header of a Space README (lists are not needed here and are skipped)."""
    parts = readme.read_text(encoding="utf-8").split("---")
    if len(parts) < 3 or parts[0].strip():
        raise SpaceBuildError(f"{readme}: expected a Space header between '---' lines at the top, found none")
    return dict(re.findall(r"^(\w+): *(\S.*?)\s*$", parts[1], flags=re.MULTILINE))


def project_requirements(pyproject: Path, extra: str = SPACE_EXTRA) -> list[Requirement]:
    """`[project.dependencies]` plus the dependencies of `extra`, in file order, without duplicates.

    References to the project itself (`hms-segmentation[other]`) are followed, since the package is vendored rather
    than installed.
    """
    project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    name = canonicalize_name(project.get("name", ""))
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        raise SpaceBuildError(f"{pyproject}: expected an optional dependency group {extra!r} in "
                              f"[project.optional-dependencies], found {sorted(extras)}")
    requirements: dict[str, Requirement] = {}
    pending, seen_extras = [(text, "dependencies") for text in project.get("dependencies", [])], set()
    pending += [(text, f"optional-dependencies.{extra}") for text in extras[extra]]
    while pending:
        text, where = pending.pop(0)
        try:
            requirement = Requirement(text)
        except InvalidRequirement as error:
            raise SpaceBuildError(f"{pyproject}: [project.{where}] holds {text!r}, not a valid requirement "
                                  f"({error})") from None
        if canonicalize_name(requirement.name) == name:
            for other in sorted(set(requirement.extras) - seen_extras):
                seen_extras.add(other)
                pending += [(text, f"optional-dependencies.{other}") for text in extras.get(other, [])]
            continue
        requirements.setdefault(canonicalize_name(requirement.name), requirement)
    return list(requirements.values())


def pinned_requirements(
    pyproject: Path = REPO_ROOT / "pyproject.toml",
    readme: Path = SPACE_DIR / "README.md",
    version_of: Callable[[str], str] = importlib.metadata.version,
) -> list[str]:
    """One `name==version` line per dependency, at the version installed here (`version_of`).

    Refused: a dependency that is not installed, or whose installed version falls outside the range pyproject asks
    for; a URL/VCS requirement; torchvision; a gradio other than the README's `sdk_version` (the Space installs that
    one whatever requirements.txt says).
    """
    sdk_version = space_header(readme).get("sdk_version")
    lines = []
    for requirement in project_requirements(pyproject):
        name = canonicalize_name(requirement.name)
        if name in NEVER_PINNED:
            raise SpaceBuildError(f"{pyproject}: {requirement} is a dependency, but the Space must not install "
                                  f"{requirement.name} (CPU image, not needed by the app); remove it")
        if requirement.url:
            raise SpaceBuildError(f"{pyproject}: {requirement} installs from a URL, which cannot be pinned to a "
                                  "version; depend on a released version instead")
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue  # not for this platform, so nothing installed here to pin
        try:
            installed = version_of(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            raise SpaceBuildError(f"{pyproject}: {requirement} is a dependency, but {requirement.name} is not "
                                  f"installed in {sys.prefix}; install it (pip install -e '.[{SPACE_EXTRA}]') and "
                                  "build again") from None
        # torch's CPU wheel reports '2.13.0+cpu'; the index option picks the CPU build of the public version
        version = Version(installed).public
        if not requirement.specifier.contains(version, prereleases=True):
            raise SpaceBuildError(f"{pyproject}: {requirement} is a dependency, but {installed} is installed; install "
                                  "a version in that range and build again")
        if name == "gradio" and version != sdk_version:
            raise SpaceBuildError(f"{readme}: the Space header sets sdk_version: {sdk_version}, but gradio {installed} "
                                  f"is installed; install gradio=={sdk_version} or change sdk_version, so that the "
                                  "Space runs the Gradio the app was tried with")
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        marker = f"; {requirement.marker}" if requirement.marker is not None else ""
        lines.append(f"{requirement.name}{extras}=={version}{marker}")
    return lines


def requirements_text(
    pyproject: Path = REPO_ROOT / "pyproject.toml",
    readme: Path = SPACE_DIR / "README.md",
    version_of: Callable[[str], str] = importlib.metadata.version,
) -> str:
    """The Space's requirements.txt: the explanation, the CPU index for torch, then the pins."""
    return REQUIREMENTS_HEADER + "".join(f"{line}\n" for line in pinned_requirements(pyproject, readme, version_of))


# ---------------------------------------------------------------------------------------------------------------------
# The folder.
# ---------------------------------------------------------------------------------------------------------------------


def prepare_output(output_dir: Path, overwrite: bool, project_root: Path = REPO_ROOT) -> list[str]:
    """Make `output_dir` ready for a build; returns the names of files in it that the builder keeps untouched.

    A non-empty folder needs `overwrite`, and even then only the builder's own entries are removed.
    """
    resolved, root = output_dir.resolve(), project_root.resolve()
    protected = [root / "space", root / "src"]
    if resolved in root.parents or resolved == root or any(resolved == p or p in resolved.parents for p in protected):
        raise SpaceBuildError(f"refusing to build into {output_dir}: it would overwrite the project's own files; "
                              "choose a folder of its own, such as build/space")
    if output_dir.exists() and not output_dir.is_dir():
        raise SpaceBuildError(f"OUTPUT_DIR {output_dir} is a file; expected a folder (new or empty)")
    existing = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
        raise SpaceBuildError(f"OUTPUT_DIR {output_dir} is not empty ({shown}); pass --overwrite to replace the Space "
                              "files in it (other files are kept), or choose a new or empty folder")
    for name in existing:
        if name in BUILT_ENTRIES:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    return [name for name in existing if name not in BUILT_ENTRIES]


def check_model_folder(folder: Path) -> None:
    """A `save_pretrained` folder fit for a public Space: config.json, safetensors weights, no pickle files."""
    if not (folder / "config.json").is_file():
        raise SpaceBuildError(f"--model {folder}: no config.json; expected a folder written by save_pretrained")
    pickles = sorted(path.name for path in folder.rglob("*") if path.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise SpaceBuildError(f"--model {folder}: holds pickle files {pickles}, which may run code when loaded; "
                              "bundle safetensors only (re-save with save_pretrained and remove them)")
    if not any(folder.glob("*.safetensors")):
        raise SpaceBuildError(f"--model {folder}: no *.safetensors weights; expected a folder written by "
                              "save_pretrained")


def build_bundle(output_dir: Path, model: str | None = None, overwrite: bool = False,
                 project_root: Path = REPO_ROOT) -> list[str]:
    """Write the Space folder (see the module docstring); returns the files it kept from before (`overwrite`).

    Everything that can fail (requirements, the model folder) is checked before the output folder is touched.
    """
    package = project_root / "src" / PACKAGE
    if not (package / "__init__.py").is_file():
        raise SpaceBuildError(f"{package}: expected the {PACKAGE} source tree (with __init__.py), found none")
    requirements = requirements_text(project_root / "pyproject.toml", project_root / "space" / "README.md")
    model_folder = Path(model) if model and Path(model).exists() else None
    if model_folder is not None:
        check_model_folder(model_folder)
    elif model and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise SpaceBuildError(f"--model {model}: no such folder (a Hub id is NAME or USER/NAME)")
    kept = prepare_output(output_dir, overwrite, project_root)
    for name in COPIED_FILES:
        shutil.copy2(project_root / "space" / name, output_dir / name)
    if (project_root / "LICENSE").is_file():  # the vendored source travels with its licence
        shutil.copy2(project_root / "LICENSE", output_dir / "LICENSE")
    shutil.copytree(package, output_dir / PACKAGE, ignore=shutil.ignore_patterns(*SOURCE_JUNK))
    (output_dir / "requirements.txt").write_text(requirements, encoding="utf-8")
    if model_folder is not None:
        shutil.copytree(model_folder, output_dir / MODEL_DIR, ignore=shutil.ignore_patterns(*SOURCE_JUNK))
        (output_dir / DEFAULT_MODEL_FILE).write_text(f"{MODEL_DIR}\n", encoding="utf-8")
    elif model:  # a Hub id or a preset name, loaded by the Space itself
        (output_dir / DEFAULT_MODEL_FILE).write_text(f"{model}\n", encoding="utf-8")
    return kept


# ---------------------------------------------------------------------------------------------------------------------
# Pushing.
# ---------------------------------------------------------------------------------------------------------------------


def check_push(repo_id: str, token: str | None) -> str:
    """The token to push with; raises before anything is built or sent when a push cannot work."""
    if hub_constants.is_offline_mode():
        raise SpaceBuildError(f"cannot push to the Space {repo_id}: the Hugging Face Hub is in offline mode "
                              "(HF_HUB_OFFLINE=1); unset it to push, or build without --push and upload the folder "
                              "yourself. Nothing was written or sent.")
    token = token or get_token()
    if not token:
        raise SpaceBuildError(f"cannot push to the Space {repo_id}: no Hugging Face token; pass --token or log in "
                              "with `hf auth login` (or set HF_TOKEN). Nothing was written or sent.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise SpaceBuildError(f"--push {repo_id!r} is not a valid Hub repository id ({error}); expected USER/SPACE. "
                              "Nothing was written or sent.") from None
    return token


def push_bundle(folder: Path, repo_id: str, token: str, private: bool = False) -> str:
    """Create the Gradio Space `repo_id` if missing and upload `folder` to it in one commit; returns the commit URL."""
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="space", ignore_patterns=list(SOURCE_JUNK),
            delete_patterns=REMOTE_BUILT_PATTERNS, commit_message="Update the HMSA Space (space/build_space.py)",
        )
    except Exception as error:  # network, permission, quota: one message naming the Space and the folder
        raise SpaceBuildError(f"pushing {folder} to the Space {repo_id} failed: {error}. The local folder is "
                              "kept; push again, or upload it yourself.") from error
    return str(getattr(commit, "commit_url", commit))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python space/build_space.py",
        description="Write a self-contained Hugging Face Space folder (app, README, pinned requirements, the "
                    "vendored hms_segmentation source, optionally a model) and optionally push it.",
    )
    parser.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="folder to write (new or empty)")
    parser.add_argument("--model", metavar="PATH_OR_ID", default=None,
                        help="default model of the Space: a save_pretrained folder (copied into the bundle), or a "
                             "Hub id / preset name (loaded by the Space); HMS_SPACE_MODEL still overrides it")
    parser.add_argument("--push", metavar="REPO_ID", default=None,
                        help="create (if missing) the Gradio Space USER/SPACE and upload the folder to it")
    parser.add_argument("--private", action="store_true", help="with --push: create the Space as private")
    parser.add_argument("--token", default=None, help="with --push: Hub token with write access (default: the "
                                                      "logged-in one)")
    parser.add_argument("--overwrite", action="store_true",
                        help="build into a non-empty OUTPUT_DIR: its Space files are replaced, other files kept")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.private or args.token) and not args.push:
        parser.error("--private and --token only apply with --push REPO_ID")
    try:
        token = check_push(args.push, args.token) if args.push else None
        kept = build_bundle(args.output_dir, model=args.model, overwrite=args.overwrite)
        print(f"wrote the Space folder {args.output_dir} (run it with: cd {args.output_dir} && python app.py)")
        if args.model:  # say which reading of PATH_OR_ID was taken: a mistyped folder would read as a Hub id
            print(f"default model: {args.model} copied into {MODEL_DIR}/" if Path(args.model).is_dir() else
                  f"default model: {args.model}, a Hub id or preset name (no such local folder), loaded by the Space")
        if kept:
            print(f"kept files the builder did not write (a push uploads them too): {', '.join(kept)}",
                  file=sys.stderr)
        if args.push:
            url = push_bundle(args.output_dir, args.push, token, private=args.private)
            print(f"pushed to https://huggingface.co/spaces/{args.push} ({url})")
    except (SpaceBuildError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
