"""The Gradio Space (`space/app.py`): served on 127.0.0.1 with a tiny model, called with `gradio_client`, and driven
in headless Chromium. The browser test's screenshot lands in `outputs/test_space/` (or `$HMS_TEST_OUTPUT_DIR`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import importlib.metadata
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from PIL import Image

from conftest import REPO_ROOT, require_shared
from tiny_configs import TINY_HRNET, save_tiny_model

gr = pytest.importorskip("gradio")
# Gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

from hms_segmentation import HMSImageProcessor  # noqa: E402
from hms_segmentation.data.io import load_image  # noqa: E402
from hms_segmentation.label_tables import CITYSCAPES_ID2LABEL  # noqa: E402

CHROMIUM = Path(os.environ.get("HMS_CHROMIUM", "/usr/bin/chromium"))  # Debian's package; Playwright's own is not used
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_SIDE = 256
MAX_FILE_MB = 1
MAX_PIXELS = 4_000_000


def _load_space_script(module_name: str, file_name: str):
    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / "space" / file_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


space = _load_space_script("hms_space_app", "app.py")
builder = _load_space_script("hms_space_builder", "build_space.py")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("space") / "tiny"
    return save_tiny_model(folder, TINY_HRNET, num_labels=19, id2label=CITYSCAPES_ID2LABEL)


@pytest.fixture(scope="module")
def street_photos() -> Path:
    return require_shared("data", "street_photos")


@pytest.fixture(scope="module")
def odd_inputs() -> Path:
    return require_shared("data", "odd_inputs")


@pytest.fixture(scope="module")
def settings(tiny_model_dir, street_photos, tmp_path_factory):
    return space.SpaceSettings(
        model=str(tiny_model_dir), fallback_models=(), max_side=MAX_SIDE, max_file_bytes=MAX_FILE_MB * 2**20,
        max_image_pixels=MAX_PIXELS, examples_dirs=(street_photos,), output_dir=tmp_path_factory.mktemp("outputs"),
    )


@pytest.fixture(scope="module")
def served(settings):
    """The app as `python space/app.py` serves it (queue, limits, examples), on a free local port."""
    loaded = space.load_space_model(settings)
    examples = space.example_images(settings, count=2)
    demo = space.build_demo(settings, loaded, examples)
    space.launch(demo, settings, examples, server_name="127.0.0.1", server_port=_free_port(),
                 prevent_thread_lock=True, quiet=True)
    yield demo
    demo.close()
    shutil.rmtree(Path(examples[0]).parent, ignore_errors=True)


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    return gradio_client.Client(served.local_url, verbose=False, download_files=str(tmp_path_factory.mktemp("dl")))


def segment(client, path: Path, scales=(0.5, 1.0), flip=False):
    return client.predict(gradio_client.handle_file(str(path)), list(scales), flip, 0.6, api_name="/segment")


def assert_still_serving(client, odd_inputs):
    label_map = segment(client, odd_inputs / "rgb_ok.png", scales=(1.0,))[4]
    assert Image.open(label_map).size == (160, 96)


# ---------------------------------------------------------------------------------------------------------------------
# The API, through gradio_client.
# ---------------------------------------------------------------------------------------------------------------------


def test_api_returns_label_map_and_attention_maps_at_the_upload_size(client, street_photos):
    photo = street_photos / "sf.jpg"
    overlay, weights, shares, timing, label_map, attention_maps = segment(client, photo, scales=(0.5, 1.0, 2.0))
    shown = Image.open(photo).size
    labels = np.asarray(Image.open(label_map))
    assert Image.open(label_map).mode == "L" and labels.shape == (shown[1], shown[0])
    assert labels.max() < 19
    assert [Path(p).name for p in attention_maps] == [f"sf_attention_{s}x.png" for s in (0.5, 1.0, 2.0)]
    assert all(Image.open(p).size == shown for p in attention_maps)
    # inference ran on the downscaled picture; the overlay is that picture
    assert max(Image.open(overlay).size) == MAX_SIDE
    assert f"downscaled to a long side of {MAX_SIDE}" in timing and re.search(r"\d+\.\d\d s", timing)
    assert [w["caption"].split(":")[0] for w in weights] == ["0.5x", "1.0x", "2.0x"]
    assert abs(sum(c["confidence"] for c in shares["confidences"]) - 1) < 1e-6
    assert {c["label"] for c in shares["confidences"]} <= set(CITYSCAPES_ID2LABEL.values())


def test_flip_and_single_scale_work(client, odd_inputs):
    *_, label_map, attention_maps = segment(client, odd_inputs / "rgb_ok.png", scales=(1.0,), flip=True)
    assert Image.open(label_map).size == (160, 96) and len(attention_maps) == 1


def test_exif_rotated_upload_gets_a_label_map_of_its_shown_size(client, odd_inputs):
    label_map = segment(client, odd_inputs / "exif_orientation6.jpg")[4]
    assert Image.open(label_map).size == (96, 160)


@pytest.mark.parametrize("name, size", [
    ("grayscale.png", (160, 96)), ("rgba.png", (160, 96)), ("palette.png", (160, 96)), ("cmyk.jpg", (160, 96)),
    ("gray16.png", (160, 96)), ("tiny_3x5.png", (5, 3)), ("one_row_1x4000.png", (4000, 1)),
])
def test_odd_but_valid_uploads_are_segmented(client, odd_inputs, name, size):
    label_map = segment(client, odd_inputs / name, scales=(1.0,))[4]
    assert Image.open(label_map).size == size


@pytest.mark.parametrize("name, reason", [
    ("not_an_image.png", "expected an image file"),
    ("empty.png", "empty file"),
    ("truncated.png", "truncated or corrupt"),
    ("truncated.jpg", "truncated or corrupt"),
    ("bomb_40000x40000.png", "decompression bomb"),
])
def test_broken_upload_is_refused_naming_the_file_and_the_app_keeps_serving(client, odd_inputs, name, reason):
    with pytest.raises(AppError) as error:
        segment(client, odd_inputs / name)
    message = str(error.value)
    assert message.startswith(f"{name}: ") and reason in message
    assert "/tmp" not in message  # Gradio's temporary copy is not what the user uploaded
    assert_still_serving(client, odd_inputs)


def test_image_over_the_pixel_limit_is_refused_and_the_app_keeps_serving(client, odd_inputs, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("RGB", (2500, 2000), (70, 130, 180)).save(huge)  # 5 MP in a few kB
    with pytest.raises(AppError, match=r"huge\.png: refused to decode a 2500x2000 image"):
        segment(client, huge)
    assert_still_serving(client, odd_inputs)


def test_file_over_the_size_limit_is_refused_and_the_app_keeps_serving(client, odd_inputs, tmp_path):
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(
        noise, compress_level=0)
    assert noise.stat().st_size > MAX_FILE_MB * 2**20
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        segment(client, noise)
    assert_still_serving(client, odd_inputs)


def test_oversized_file_is_refused_by_the_app_itself_too(settings, tmp_path):
    # The server refuses large uploads at the door; the reader refuses them again should a file arrive otherwise.
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (MAX_FILE_MB * 2**20 + 1))
    with pytest.raises(gr.Error, match=rf"big\.jpg: the file has 1\.0 MB, more than the {MAX_FILE_MB} MB"):
        space.read_upload({"path": str(big), "orig_name": "big.jpg"}, settings)


def test_requests_are_queued_with_the_concurrency_limit(served, settings):
    assert served._queue.max_size == settings.queue_size
    assert served._queue.default_concurrency_limit == settings.concurrency_limit
    assert served.max_file_size == settings.max_file_bytes


def test_no_scale_ticked_gives_a_clear_error(client, odd_inputs):
    with pytest.raises(AppError, match="Tick at least one inference scale"):
        segment(client, odd_inputs / "rgb_ok.png", scales=())


# ---------------------------------------------------------------------------------------------------------------------
# Model loading and the pieces of the page.
# ---------------------------------------------------------------------------------------------------------------------


def test_unreachable_hub_model_falls_back_to_the_quickstart_checkpoint(tiny_model_dir, tmp_path):
    settings = space.SpaceSettings(model="hms-segmentation/no-such-model", fallback_models=(tmp_path / "missing",
                                                                                            tiny_model_dir))
    loaded = space.load_space_model(settings)
    assert loaded.model is not None and loaded.source == str(tiny_model_dir)
    assert "quickstart checkpoint" in loaded.notice and "hms-segmentation/no-such-model" in loaded.notice


@pytest.mark.parametrize("problem, reason", [
    ("other type", "its config.json describes a 'segformer' model"),
    ("missing tensors", "its weights do not fit its config.json: 1 missing tensors"),
])
def test_a_folder_that_is_not_a_complete_hms_model_falls_back_with_the_reason(tiny_model_dir, tmp_path, problem,
                                                                              reason):
    # transformers stopped the app at start-up on another model type, and filled missing tensors at random
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    if problem == "other type":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "segformer"}))
    else:
        weights = load_file(folder / "model.safetensors")
        del weights["scale_attention_head.projection.weight"]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = space.load_space_model(space.SpaceSettings(model=str(folder), fallback_models=(tiny_model_dir,)))
    assert loaded.model is not None and loaded.source == str(tiny_model_dir)
    assert f"The model `{folder}` could not be loaded ({reason}" in loaded.notice
    assert "--model" not in loaded.notice


def test_without_any_checkpoint_the_page_says_so_instead_of_crashing(tmp_path):
    settings = space.SpaceSettings(model=str(tmp_path / "no-model"), fallback_models=(tmp_path / "missing",),
                                   examples_dirs=())
    loaded = space.load_space_model(settings)
    assert loaded.model is None
    demo = space.build_demo(settings, loaded, examples=())
    texts = [c.get("props", {}).get("value") for c in demo.config["components"]]
    notice = next(t for t in texts if isinstance(t, str) and "No trained checkpoint" in t)
    assert "hms-segmentation quickstart" in notice and str(tmp_path / "missing") in notice
    button = next(c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "run")
    assert button["props"]["interactive"] is False


def test_preset_name_loads_random_weights_and_says_so():
    loaded = space.load_space_model(space.SpaceSettings(model="hrnet_small_ocr", fallback_models=()))
    assert loaded.model is not None and "random weights" in loaded.notice


def test_tiled_inference_is_configured_from_the_environment():
    settings = space.SpaceSettings.from_environment({"HMS_SPACE_MODEL": "hrnet_small_ocr",
                                                     "HMS_SPACE_TILE_PIXEL_BUDGET": "262144", "HMS_SPACE_TILE_SIZE": "512"})
    loaded = space.load_space_model(dataclasses.replace(settings, fallback_models=()))
    assert (loaded.model.config.tile_pixel_budget, list(loaded.model.config.tile_size)) == (262144, [512, 512])
    too_small = dataclasses.replace(settings, fallback_models=(), tile_pixel_budget=100)
    assert space.load_space_model(too_small).model is None  # the page names the bad setting instead of crashing
    assert "tile_pixel_budget" in space.load_space_model(too_small).notice


def test_scale_weights_follow_the_attention_chain_and_sum_to_one():
    from hms_segmentation import hierarchical_scale_weights

    attentions = [np.full((2, 3), 0.25), np.full((2, 3), 0.5), np.full((2, 3), 0.9)]
    weights = hierarchical_scale_weights(attentions)
    assert [float(w[0, 0]) for w in weights] == [0.25, 0.75 * 0.5, 0.75 * 0.5]
    assert np.allclose(sum(weights), 1)


def test_downscaled_upload_gives_the_model_the_pixels_of_the_processors_long_side_limit(street_photos):
    photo = load_image(street_photos / "sf.jpg")  # 1920x1080
    working = space.downscale(photo, 768)
    assert max(working.size) == 768
    # a LANCZOS shrink, then the processor's size-divisor resize, was up to 34 levels off
    torch.testing.assert_close(HMSImageProcessor()(working, return_tensors="pt")["pixel_values"],
                               HMSImageProcessor(max_long_side=768)(photo, return_tensors="pt")["pixel_values"],
                               rtol=0, atol=0)
    assert space.downscale(working, 768) is working


def test_settings_are_read_from_the_environment():
    settings = space.SpaceSettings.from_environment({
        "HMS_SPACE_MODEL": "some/model", "HMS_SPACE_MAX_SIDE": "640", "HMS_SPACE_MAX_FILE_MB": "2.5",
        "HMS_SPACE_SCALES": "0.25,1.0", "HMS_SPACE_CONCURRENCY": "2",
    })
    assert (settings.model, settings.max_side, settings.max_file_bytes) == ("some/model", 640, int(2.5 * 2**20))
    assert settings.default_scales == (0.25, 1.0) and settings.concurrency_limit == 2
    assert space.SpaceSettings.from_environment({}).model == space.DEFAULT_MODEL
    assert space.SpaceSettings.from_environment({}).host == "127.0.0.1"
    assert space.SpaceSettings.from_environment({"SPACE_ID": "org/space"}).host == "0.0.0.0"
    with pytest.raises(ValueError, match="HMS_SPACE_MAX_SIDE must be a positive integer, got 'big'"):
        space.SpaceSettings.from_environment({"HMS_SPACE_MAX_SIDE": "big"})
    with pytest.raises(ValueError, match="HMS_SPACE_SCALES must be taken from"):
        space.SpaceSettings.from_environment({"HMS_SPACE_SCALES": "3.0"})
    with pytest.raises(ValueError, match="HMS_SPACE_SCALES must be taken from"):
        space.SpaceSettings.from_environment({"HMS_SPACE_SCALES": "half"})


def test_space_readme_header_and_requirements_agree():
    readme = (REPO_ROOT / "space" / "README.md").read_text()
    header = dict(re.findall(r"^(\w+): *(.*)$", readme.split("---")[1], flags=re.MULTILINE))
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py" and header["license"] == "apache-2.0"
    assert (REPO_ROOT / "space" / header["app_file"]).is_file() and header["title"]
    assert "hms-segmentation/" in readme.split("models:")[1].split("\n")[1]
    lines = (REPO_ROOT / "space" / "requirements.txt").read_text().splitlines()
    requirements = "\n".join(line for line in lines if not line.startswith("#"))
    assert f"gradio=={header['sdk_version']}" in requirements
    assert "torch==" in requirements and "whl/cpu" in requirements and "torchvision" not in requirements
    # the package is vendored into the Space folder by space/build_space.py, not installed from a URL
    assert "hms-segmentation" not in requirements and "git+" not in requirements
    assert "space/build_space.py vendors" in " ".join(line.lstrip("# ") for line in lines if line.startswith("#"))


# ---------------------------------------------------------------------------------------------------------------------
# The self-contained Space folder (space/build_space.py).
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bundle") / "space"
    assert builder.main([str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def model_bundle(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("bundle") / "space"
    assert builder.main([str(folder), "--model", str(tiny_model_dir)]) == 0
    return folder


def relative_files(root: Path, pattern: str = "*") -> list[Path]:
    return sorted(path.relative_to(root) for path in root.rglob(pattern) if path.is_file())


def requirement_lines(text: str) -> list[str]:
    """The requirement lines of a requirements.txt: no comments, no options."""
    return [line for line in text.splitlines() if line.strip() and not line.startswith(("#", "-"))]


def test_bundle_vendors_the_whole_package_next_to_the_app(bundle):
    source, vendored = REPO_ROOT / "src" / "hms_segmentation", bundle / "hms_segmentation"
    python_files = relative_files(source, "*.py")
    assert python_files and relative_files(vendored, "*.py") == python_files
    assert all((vendored / name).read_bytes() == (source / name).read_bytes() for name in python_files)
    assert not list(vendored.rglob("__pycache__")) and not list(vendored.rglob("*.py[co]"))
    for name in ("app.py", "README.md", "LICENSE"):
        assert (bundle / name).read_bytes() == ((REPO_ROOT / "space" / name) if name != "LICENSE"
                                                else REPO_ROOT / name).read_bytes()
    # without --model the Space loads the Hub model, as `python space/app.py` does
    assert not (bundle / builder.DEFAULT_MODEL_FILE).exists()
    assert space.bundled_default_model(bundle) == space.DEFAULT_MODEL


def test_bundle_requirements_pin_every_dependency_to_the_installed_version(bundle):
    text = (bundle / "requirements.txt").read_text()
    project = builder.tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["space"]
    requirements = [Requirement(line) for line in requirement_lines(text)]
    assert {canonicalize_name(r.name) for r in requirements} == {canonicalize_name(Requirement(d).name)
                                                                  for d in declared}
    for requirement in requirements:
        (specifier,) = requirement.specifier
        assert requirement.url is None and specifier.operator == "=="
        assert specifier.version == Version(importlib.metadata.version(requirement.name)).public
    options = [line for line in text.splitlines() if line.startswith("-")]
    assert options == ["--extra-index-url https://download.pytorch.org/whl/cpu"]  # torch's CPU wheel
    assert not any("torchvision" in line or "://" in line or "git+" in line for line in requirement_lines(text))
    header = dict(re.findall(r"^(\w+): *(.*)$", (bundle / "README.md").read_text().split("---")[1], re.MULTILINE))
    assert f"gradio=={header['sdk_version']}" in requirement_lines(text)


def test_committed_requirements_are_what_the_builder_writes(bundle):
    # same comments, options and packages; the versions are those of the environment that ran the builder
    def unpinned(text: str) -> str:
        return re.sub(r"==\S+", "==", text)

    committed = (REPO_ROOT / "space" / "requirements.txt").read_text()
    assert unpinned(committed) == unpinned((bundle / "requirements.txt").read_text())


def test_bundle_imports_its_vendored_package_and_loads_its_bundled_model(model_bundle, tiny_model_dir):
    import hms_segmentation

    # here the editable install answers; in the bundle, the app's folder comes first on sys.path and must win
    assert Path(hms_segmentation.__file__).resolve().is_relative_to(REPO_ROOT / "src")
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "HMS_SPACE_MODEL")}
    env.update(HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    code = ("import json, app, hms_segmentation; settings = app.SpaceSettings.from_environment(); "
            "loaded = app.load_space_model(settings); "
            "print(json.dumps([hms_segmentation.__file__, app.__file__, settings.model, loaded.source, loaded.notice]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=model_bundle, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    package, app_file, model, source, notice = json.loads(result.stdout.splitlines()[-1])
    root = model_bundle.resolve()
    assert Path(package).resolve() == root / "hms_segmentation" / "__init__.py"
    assert Path(app_file).resolve() == root / "app.py"
    assert model == source == str(root / "model") and notice == ""  # the bundled model, not the Hub's
    assert relative_files(model_bundle / "model") == relative_files(tiny_model_dir)


def test_model_option_records_a_hub_id_and_refuses_pickles(tmp_path, tiny_model_dir):
    assert builder.main([str(tmp_path / "hub"), "--model", "someone/hms-model"]) == 0
    assert space.bundled_default_model(tmp_path / "hub") == "someone/hms-model"
    assert not (tmp_path / "hub" / "model").exists()
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(builder.SpaceBuildError, match=r"pickle files \['pytorch_model.bin'\]"):
        builder.build_bundle(tmp_path / "refused", model=str(pickled))
    assert not (tmp_path / "refused").exists()  # checked before anything is written


def test_non_empty_folder_needs_overwrite_which_replaces_only_the_space_files(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "space"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert builder.main([str(folder)]) == 1
    error = capsys.readouterr().err
    assert f"OUTPUT_DIR {folder} is not empty (notes.txt)" in error and "--overwrite" in error
    assert [path.name for path in folder.iterdir()] == ["notes.txt"]
    assert builder.main([str(folder), "--overwrite", "--model", str(tiny_model_dir)]) == 0
    assert (folder / "model" / "config.json").is_file()
    assert builder.main([str(folder), "--overwrite"]) == 0  # the rebuild drops the earlier model
    assert not (folder / "model").exists() and not (folder / builder.DEFAULT_MODEL_FILE).exists()
    assert (folder / "notes.txt").read_text() == "mine" and "notes.txt" in capsys.readouterr().err


def test_builder_refuses_to_write_over_the_project(tmp_path):
    project = tmp_path / "project"
    (project / "space").mkdir(parents=True)
    (project / "space" / "app.py").write_text("# the source")
    for target in (project, project / "space", project / "src" / "hms_segmentation" / "x", tmp_path):
        with pytest.raises(builder.SpaceBuildError, match="overwrite the project's own files"):
            builder.prepare_output(target, overwrite=True, project_root=project)
    assert (project / "space" / "app.py").read_text() == "# the source"


def test_builder_refuses_a_gradio_other_than_the_sdk_version():
    readme = REPO_ROOT / "space" / "README.md"
    sdk_version = builder.space_header(readme)["sdk_version"]

    def version_of(name: str) -> str:
        return "6.99.0" if name == "gradio" else importlib.metadata.version(name)

    with pytest.raises(builder.SpaceBuildError, match=rf"sdk_version: {re.escape(sdk_version)}, but gradio 6\.99\.0"):
        builder.pinned_requirements(REPO_ROOT / "pyproject.toml", readme, version_of)


@pytest.mark.parametrize("dependency, message", [
    ("torchvision>=0.19", "the Space must not install torchvision"),
    ("foo @ git+https://example.com/foo", "installs from a URL"),
    ("no-such-package-hms>=1", "no-such-package-hms is not installed"),
    ("numpy<1", "is installed; install a version in that range"),
])
def test_builder_refuses_dependencies_a_space_cannot_pin(tmp_path, dependency, message):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\nname = "x"\ndependencies = [{json.dumps(dependency)}]\n'
                         '[project.optional-dependencies]\nspace = []\n')
    with pytest.raises(builder.SpaceBuildError, match=re.escape(message)) as error:
        builder.pinned_requirements(pyproject, REPO_ROOT / "space" / "README.md")
    assert str(error.value).startswith(str(pyproject))


class FakeSpaceApi:
    """Stands in for `HfApi`: records the Space it creates and the files of each folder upload."""

    instances: list[FakeSpaceApi] = []

    def __init__(self, token: str | None = None):
        self.token, self.repos, self.uploads = token, [], []
        FakeSpaceApi.instances.append(self)

    def create_repo(self, repo_id: str, **kwargs):
        self.repos.append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/spaces/{repo_id}"

    def upload_folder(self, *, repo_id: str, folder_path, repo_type=None, **kwargs):
        folder = Path(folder_path)
        self.uploads.append({"repo_id": repo_id, "folder": folder, "repo_type": repo_type,
                             "files": relative_files(folder), **kwargs})
        return SimpleNamespace(commit_url=f"https://huggingface.co/spaces/{repo_id}/commit/0123abc")


@pytest.fixture
def fake_space_hub(monkeypatch):
    FakeSpaceApi.instances = []
    monkeypatch.setattr(builder, "HfApi", FakeSpaceApi)
    monkeypatch.setattr(builder, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return FakeSpaceApi


def test_push_creates_a_gradio_space_and_uploads_the_folder(fake_space_hub, tmp_path, capsys):
    folder = tmp_path / "space"
    assert builder.main([str(folder), "--push", "someone/hms-space", "--private", "--token", "hf_test"]) == 0
    (api,) = fake_space_hub.instances
    assert api.token == "hf_test"
    assert api.repos == [{"repo_id": "someone/hms-space", "repo_type": "space", "space_sdk": "gradio",
                          "private": True, "exist_ok": True}]
    (upload,) = api.uploads
    assert (upload["repo_id"], upload["folder"], upload["repo_type"]) == ("someone/hms-space", folder, "space")
    assert upload["files"] == relative_files(folder)
    assert {Path("app.py"), Path("README.md"), Path("requirements.txt"),
            Path("hms_segmentation/__init__.py")} <= set(upload["files"])
    assert "https://huggingface.co/spaces/someone/hms-space/commit/0123abc" in capsys.readouterr().out


@pytest.mark.parametrize("offline, token, message", [
    (True, "hf_test", "offline mode (HF_HUB_OFFLINE=1)"),
    (False, None, "no Hugging Face token"),
])
def test_push_fails_early_offline_or_without_a_token(fake_space_hub, monkeypatch, tmp_path, capsys, offline, token,
                                                     message):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    folder = tmp_path / "space"
    assert builder.main([str(folder), "--push", "someone/hms-space", *(["--token", token] if token else [])]) == 1
    error = capsys.readouterr().err
    assert message in error and "someone/hms-space" in error and "Nothing was written or sent" in error
    assert fake_space_hub.instances == [] and not folder.exists()


def test_builder_command_line(tmp_path):
    script = REPO_ROOT / "space" / "build_space.py"
    shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0
    assert all(option in shown.stdout for option in ("OUTPUT_DIR", "--model", "--push", "--private", "--overwrite"))
    # offline from the environment, as a user would set it: refused before anything is built
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    pushed = subprocess.run([sys.executable, str(script), str(tmp_path / "space"), "--push", "someone/hms-space",
                             "--token", "hf_test"], capture_output=True, text=True, env=env, timeout=120)
    assert pushed.returncode == 1 and "offline mode (HF_HUB_OFFLINE=1)" in pushed.stderr
    assert not (tmp_path / "space").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The page, in headless Chromium.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    reason = None
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} not found (apt-get install chromium); HMS_REQUIRE_BROWSER=1 makes this a failure"
    elif importlib.util.find_spec("playwright") is None:
        reason = "playwright is not installed (pip install -e '.[test]'); HMS_REQUIRE_BROWSER=1 makes this a failure"
    if reason:
        if os.environ.get("HMS_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_page_in_headless_chromium_shows_overlay_and_attention_maps(chromium, served, street_photos):
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    # Everything the page needs is served locally; outside requests (web fonts) are refused so the test never waits
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(served.local_url)
               else route.abort())
    page.goto(served.local_url, wait_until="domcontentloaded")
    page.locator("#run").wait_for(state="visible", timeout=30_000)
    assert "road" in page.locator("#legend").inner_text()
    page.locator("#image-input input[type=file]").set_input_files(str(street_photos / "nyc.jpg"))
    page.locator("#image-input img").first.wait_for(state="visible", timeout=30_000)
    page.locator("#run").click()
    overlay = page.locator("#overlay img").first
    overlay.wait_for(state="visible", timeout=60_000)
    page.locator("#attention img").nth(2).wait_for(state="visible", timeout=60_000)
    assert page.locator("#attention img").count() == 3  # the default scales 0.5, 1.0, 2.0
    assert overlay.evaluate("img => img.complete && img.naturalWidth") == MAX_SIDE
    assert re.search(r"\d+\.\d\d s for scales 0\.5, 1\.0, 2\.0", page.locator("#timing").inner_text())
    output_dir = Path(os.environ.get("HMS_TEST_OUTPUT_DIR", REPO_ROOT / "outputs")) / "test_space"
    output_dir.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=output_dir / "page.png", full_page=True)
    print(f"screenshot of the Space: {output_dir / 'page.png'}")
    page.close()
