"""Hub integration: AutoClasses, remote code without the package, pipeline, model card, push, Hub-ready conversion."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

from hms_segmentation import HMSConfig, HMSForSemanticSegmentation, HMSImageProcessor, hub
from hms_segmentation.cli import main as cli_main
from hms_segmentation.convert_nvidia import NVIDIA_KEY_PREFIXES, CheckpointConversionError, load_checkpoint_state_dict
from hms_segmentation.hub import (
    LOCAL_MODEL_ID,
    ORIGINAL_REPOSITORY_URL,
    PAPER_URL,
    HubPublishingError,
    build_model_card,
    check_hub_folder,
    load_evaluation_results,
    push_to_hub,
    result_from_trainer_metrics,
    save_for_hub,
)
from hms_segmentation.label_tables import CITYSCAPES_ID2LABEL
from fake_hub import install_fake_hub
from tiny_configs import TINY_HRNET

CLASS_NAMES = {0: "road", 1: "sidewalk", 2: "building", 3: "sky", 4: "car"}
REMOTE_CODE_FILES = {
    "configuration_hms.py", "modeling_hms.py", "image_processing_hms.py", "backbone_hrnet.py", "backbone_resnet.py",
    "backbone_mobilenet.py", "backbone_transformers.py", "scale_fusion_baselines.py", "tiled_inference.py",
    "head_ocr.py", "head_deeplabv3plus.py", "residual_blocks.py", "rmi_loss.py", "label_tables.py",
}
EVALUATION = {
    "model": "runs/tiny",
    "results": [
        {"scales": [1.0], "flip": False, "images": 3, "seconds_per_image": 0.01, "mean_iou": 0.41237,
         "mean_accuracy": 0.5, "overall_accuracy": 0.7, "per_category_iou": {n: 0.4 for n in CLASS_NAMES.values()}},
        {"scales": [0.5, 1.0, 2.0], "flip": False, "images": 3, "seconds_per_image": 0.03, "mean_iou": 0.45678,
         "mean_accuracy": 0.55, "overall_accuracy": 0.75, "per_category_iou": {n: 0.45 for n in CLASS_NAMES.values()}},
    ],
}


@pytest.fixture(scope="module")
def tiny_model() -> HMSForSemanticSegmentation:
    torch.manual_seed(0)
    return HMSForSemanticSegmentation(HMSConfig(**{**TINY_HRNET, "id2label": CLASS_NAMES})).eval()


@pytest.fixture(scope="module")
def results_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("evaluation") / "results.json"
    path.write_text(json.dumps(EVALUATION))
    return path


@pytest.fixture(scope="module")
def hub_folder(tiny_model, results_json, tmp_path_factory) -> Path:
    """A Hub-ready folder whose card's usage code loads the folder itself."""
    folder = tmp_path_factory.mktemp("hms-tiny")
    return save_for_hub(tiny_model, folder, evaluation=results_json, dataset="cityscapes", repo_id=str(folder))


@pytest.fixture(scope="module")
def street_image(shared_data_dir) -> Path:
    return shared_data_dir / "odd_inputs" / "rgb_ok.png"


def in_package_logits(model: HMSForSemanticSegmentation, image: Path, scales: list[float]) -> torch.Tensor:
    inputs = HMSImageProcessor()(str(image), return_tensors="pt")
    with torch.no_grad():
        return model(pixel_values=inputs["pixel_values"], scales=scales).logits


# --- AutoClasses and remote code --------------------------------------------------------------------------------


def test_save_pretrained_writes_remote_code_with_auto_map(hub_folder):
    files = {path.name for path in check_hub_folder(hub_folder)}
    assert REMOTE_CODE_FILES <= files
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_hms.HMSConfig",
        "AutoModelForSemanticSegmentation": "modeling_hms.HMSForSemanticSegmentation",
    }
    processor_config = json.loads((hub_folder / "preprocessor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoImageProcessor": "image_processing_hms.HMSImageProcessor"}


@pytest.mark.parametrize("trust_remote_code", [None, True])
def test_auto_classes_resolve_the_installed_classes_after_import(
    hub_folder, tiny_model, street_image, trust_remote_code
):
    kwargs = {} if trust_remote_code is None else {"trust_remote_code": trust_remote_code}
    assert type(AutoConfig.from_pretrained(hub_folder, **kwargs)) is HMSConfig
    assert type(AutoImageProcessor.from_pretrained(hub_folder, **kwargs)) is HMSImageProcessor
    model = AutoModelForSemanticSegmentation.from_pretrained(hub_folder, **kwargs).eval()
    assert type(model) is HMSForSemanticSegmentation
    torch.testing.assert_close(
        in_package_logits(model, street_image, [1.0]), in_package_logits(tiny_model, street_image, [1.0])
    )


REMOTE_ONLY_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, re, sys

    class RefuseOurPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hms_segmentation" or name.startswith("hms_segmentation."):
                raise ImportError(f"{name} may not be imported here: the model must load from its remote code")

    sys.meta_path.insert(0, RefuseOurPackage())
    try:
        import hms_segmentation
        raise SystemExit("hms_segmentation was importable")
    except ImportError:
        pass

    import numpy as np
    import torch
    from transformers import AutoConfig

    folder, image, output = sys.argv[1:4]
    # the card's usage code, as a user copies it: pipeline, then processor + model with chained scales
    card_code = {}
    for block in re.findall(r"```python\\n(.*?)```", open(folder + "/README.md").read(), flags=re.DOTALL):
        exec(compile(block, "README.md", "exec"), card_code)
    processor, model, segmenter = card_code["processor"], card_code["model"], card_code["segmenter"]
    with torch.no_grad():
        inputs = processor(image, return_tensors="pt")
        logits = model(pixel_values=inputs["pixel_values"], scales=[0.5, 1.0, 2.0]).logits
    np.save(output + "/logits.npy", logits.numpy())
    segments = segmenter(image)
    print(json.dumps({
        "modules": [type(obj).__module__ for obj in (AutoConfig.from_pretrained(folder, trust_remote_code=True),
                                                      processor, model, segmenter.model)],
        "segments": [[segment["label"], list(segment["mask"].size)] for segment in segments],
        "imported": sorted(name for name in sys.modules if name.startswith("hms_segmentation")),
    }))
    """
)


def test_remote_code_loads_without_the_package(hub_folder, tiny_model, tmp_path):
    # the size of the card's example image, so that every forward reuses the shapes the card's code ran
    image = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 256, 3), dtype=np.uint8)).save(image)
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "critical",
    }
    # -I: no PYTHONPATH, no script or working directory on sys.path; the meta-path finder refuses the editable install
    result = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_ONLY_SCRIPT, str(hub_folder), str(image), str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["imported"] == []
    assert all(module.startswith("transformers_modules.") for module in report["modules"]), report["modules"]
    expected = in_package_logits(tiny_model, image, [0.5, 1.0, 2.0])
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "logits.npy")), expected)
    assert report["segments"] and all(label in CLASS_NAMES.values() and size == [256, 128]
                                      for label, size in report["segments"])


# --- pipeline ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter(hub_folder):
    return pipeline("image-segmentation", model=str(hub_folder))


def test_pipeline_returns_one_mask_per_class_with_its_label(segmenter, tiny_model, street_image):
    assert type(segmenter.model) is HMSForSemanticSegmentation
    segments = segmenter(str(street_image))
    labels = [segment["label"] for segment in segments]
    assert len(labels) == len(set(labels)) and set(labels) <= set(CLASS_NAMES.values())
    masks = np.stack([np.asarray(segment["mask"]) for segment in segments])
    assert masks.shape[1:] == (96, 160) and set(np.unique(masks)) <= {0, 255}
    assert bool(((masks > 0).sum(axis=0) == 1).all())  # the masks partition the image
    processor = HMSImageProcessor()
    logits = in_package_logits(tiny_model, street_image, tiny_model.config.inference_scales)
    expected = processor.post_process_semantic_segmentation({"logits": logits}, target_sizes=[(96, 160)])[0]
    for segment in segments:
        class_id = {name: index for index, name in CLASS_NAMES.items()}[segment["label"]]
        np.testing.assert_array_equal(np.asarray(segment["mask"]) > 0, (expected == class_id).numpy())


def test_pipeline_chains_the_scales_chosen_per_call(segmenter, street_image):
    calls = []
    handle = segmenter.model.scale_attention_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        def scales_run() -> int:
            calls.clear()
            segmenter(str(street_image))
            return len(calls)

        assert scales_run() == 3  # config.inference_scales: 0.5, 1.0, 2.0
        segmenter.image_processor.inference_scales = [1.0]
        assert scales_run() == 1
        segmenter.image_processor.inference_scales = [0.5, 1.0]
        assert scales_run() == 2
        segmenter.image_processor.inference_scales = None
        segmenter.model.config.inference_scales = [1.0]
        assert scales_run() == 1
    finally:
        handle.remove()
        segmenter.image_processor.inference_scales = None
        segmenter.model.config.inference_scales = [0.5, 1.0, 2.0]


def test_degenerate_images_run_through_the_model(tiny_model, shared_data_dir):
    processor = HMSImageProcessor()
    for name, size in (("tiny_3x5.png", (3, 5)), ("one_row_1x4000.png", (1, 4000))):
        inputs = processor(str(shared_data_dir / "odd_inputs" / name), return_tensors="pt")
        with torch.no_grad():
            outputs = tiny_model(pixel_values=inputs["pixel_values"], scales=[0.5, 1.0])
        assert processor.post_process_semantic_segmentation(outputs, target_sizes=[size])[0].shape == size


# --- model card -------------------------------------------------------------------------------------------------


def test_model_card_metadata_comes_from_the_evaluation_json(hub_folder):
    card = ModelCard.load(hub_folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-segmentation"
    assert card.data.license == "apache-2.0" and card.data.datasets == ["cityscapes"]
    mean_ious = {result.metric_name: result.metric_value for result in card.data.eval_results
                 if result.metric_type == "mean_iou"}
    assert mean_ious == {"mIoU (scales 1.0)": 41.24, "mIoU (scales 0.5,1.0,2.0)": 45.68}
    assert {result.dataset_split for result in card.data.eval_results} == {"val"}
    assert PAPER_URL in card.text and ORIGINAL_REPOSITORY_URL in card.text and "@article{tao2020" in card.text
    assert "training scales: 0.5, 1.0" in card.text and "RMI" in card.text
    assert "| **mIoU** | **41.2** | **45.7** |" in card.text


def test_an_evaluation_under_autocast_is_named_so_in_the_model_index():
    from hms_segmentation.hub import KNOWN_DATASETS, evaluation_to_eval_results

    rows = [{**EVALUATION["results"][0], "precision": "fp32"}, {**EVALUATION["results"][0], "precision": "fp16"}]
    names = [result.metric_name for result in evaluation_to_eval_results({"results": rows}, KNOWN_DATASETS["cityscapes"],
                                                                         "val") if result.metric_type == "mean_iou"]
    assert names == ["mIoU (scales 1.0)", "mIoU (scales 1.0 fp16)"]


def test_a_class_absent_from_the_evaluation_reads_n_a_in_the_card(tiny_model, tmp_path):
    """`hms-segmentation evaluate` writes null for a class no image holds (its IoU is undefined)."""
    rows = [{**row, "per_category_iou": {**row["per_category_iou"], "car": None}} for row in EVALUATION["results"]]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**EVALUATION, "results": rows}))
    card = build_model_card(tiny_model.config, evaluation=path, dataset="cityscapes")
    assert "| car | n/a | n/a |" in card.text and "| road | 40.0 | 45.0 |" in card.text
    assert "resized" not in card.text
    path.write_text(json.dumps({**EVALUATION, "eval_long_side": 2177}))  # the reference's Mapillary protocol
    card = build_model_card(tiny_model.config, evaluation=path, dataset="cityscapes")
    assert "`val` split (images and labels resized to a 2177-pixel long side, as the reference evaluates)" in card.text


def test_the_table_of_a_split_without_labelled_pixels_reads_n_a():
    from hms_segmentation.hub import markdown_table

    row = {**EVALUATION["results"][0], "per_category_iou": {"road": float("nan")}}
    for unmeasured in (float("nan"), None):  # as computed, and as results.json stores it
        table = markdown_table([{**row, "mean_iou": unmeasured, "overall_accuracy": unmeasured}])
        assert "| road | n/a |" in table and "| **mIoU** | **n/a** |" in table and "| pixel accuracy | n/a |" in table


def test_results_of_several_models_are_refused_for_a_card_naming_why(tiny_model, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"dataset": "cityscapes", "results_by_model": {"a": EVALUATION["results"]}}))
    with pytest.raises(ValueError, match=r"results.json: holds the results of several models .* one --model"):
        build_model_card(tiny_model.config, evaluation=path, dataset="cityscapes")


def test_card_without_evaluation_claims_no_miou(tiny_model):
    card = build_model_card(tiny_model.config)
    assert card.data.eval_results is None and "Not evaluated yet" in card.text
    assert f'model="{LOCAL_MODEL_ID}"' in card.text


@pytest.mark.parametrize("config_kwargs, tags, name", [
    ({"trunk": "hrnet_ocr"}, ["hrnet", "ocr"], "hms-hrnet-ocr"),
    ({"trunk": "resnet50_deeplabv3plus"}, ["resnet", "deeplabv3plus"], "hms-resnet50-deeplabv3plus"),
    ({"trunk": "mobilenetv2_deeplabv3plus"}, ["mobilenet-v2", "deeplabv3plus"], "hms-mobilenetv2-deeplabv3plus"),
    ({"backbone_config": {"model_type": "convnext"}}, ["convnext", "deeplabv3plus"], "hms-backbone-deeplabv3plus"),
], ids=["hrnet", "resnet", "mobilenet", "transformers-backbone"])
def test_card_tags_and_names_the_trunk_it_describes(config_kwargs, tags, name):
    card = build_model_card(HMSConfig(**config_kwargs))  # configs only: no weights are built
    assert card.data.tags[-2:] == tags and "resnet" not in card.data.tags[:-2]
    assert "# folder" not in card.text and f"# {name}" in card.text
    assert build_model_card(HMSConfig(**config_kwargs), repo_id="user/my-model").data.model_name == "my-model"


def test_card_from_trainer_metrics_has_a_model_index(tiny_model):
    metrics = {"multi_scale_mean_iou": 0.3, "multi_scale_overall_accuracy": 0.6, "multi_scale_iou_road": 0.5,
               "multi_scale_loss": 1.2}
    row = result_from_trainer_metrics(metrics, "multi_scale", [0.5, 1.0, 2.0], images=30)
    assert row["per_category_iou"] == {"road": 0.5} and row["mean_iou"] == 0.3
    card = build_model_card(tiny_model.config, evaluation={"results": [row], "dataset": "synthetic"})
    assert [result.metric_value for result in card.data.eval_results] == [30.0, 60.0]
    assert card.data.datasets == ["hms-synthetic-street-scenes"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON"),
        ('{"results": []}', "non-empty 'results'"),
        ('{"results": [{"scales": [1.0]}]}', r"results\[0\]: lacks \['mean_iou'\]"),
        ('{"results": [{"scales": [1.0], "mean_iou": 81.2}]}', r"'mean_iou' must be a fraction in \[0, 1\]"),
        ('{"results": [{"scales": [], "mean_iou": 0.8}]}', "'scales' must be a non-empty list"),
    ],
)
def test_malformed_evaluation_json_names_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_evaluation_results(path)
    assert "results.json" in str(error.value)


def test_evaluation_must_name_its_dataset(tiny_model, results_json):
    with pytest.raises(ValueError, match="dataset must be given"):
        build_model_card(tiny_model.config, evaluation=results_json)


# --- push -------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    return install_fake_hub(monkeypatch)


@pytest.fixture
def plain_folder(tiny_model, tmp_path) -> Path:
    """A bare `save_pretrained` folder: weights and config, no processor, no card."""
    folder = tmp_path / "plain"
    tiny_model.save_pretrained(folder)
    for path in folder.glob("*.py"):
        path.unlink()
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_push_uploads_everything_in_one_commit(fake_hub, plain_folder, results_json):
    before = snapshot(plain_folder)
    url = push_to_hub(plain_folder, "someone/hms-tiny", private=True, token="hf_test", evaluation=results_json,
                      dataset="cityscapes")
    assert url == "https://huggingface.co/someone/hms-tiny/commit/0123abc"
    (api,) = fake_hub.instances
    assert api.token == "hf_test" and api.repos == [{"repo_id": "someone/hms-tiny", "private": True, "exist_ok": True}]
    (commit,) = api.commits
    assert REMOTE_CODE_FILES | {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} == set(
        commit["files"]
    )
    card = ModelCard(commit["files"]["README.md"].decode())
    assert 'model="someone/hms-tiny"' in card.text and len(card.data.eval_results) == 4
    assert snapshot(plain_folder) == before  # the local folder is left as it was
    assert not any(path.exists() for path in api.staged_paths)  # the staging folder is gone


def test_pushed_card_points_at_the_repository(fake_hub, tiny_model, tmp_path):
    folder = save_for_hub(tiny_model, tmp_path / "ready")
    push_to_hub(folder, "someone/hms-tiny", token="hf_test")
    readme = fake_hub.instances[0].commits[0]["files"]["README.md"].decode()
    assert 'model="someone/hms-tiny"' in readme and LOCAL_MODEL_ID not in readme


def test_results_given_at_push_time_renew_the_card_but_keep_its_license(fake_hub, tiny_model, results_json, tmp_path):
    folder = save_for_hub(tiny_model, tmp_path / "converted", license="bsd-3-clause")
    push_to_hub(folder, "someone/hms-tiny", token="hf_test", evaluation=results_json, dataset="cityscapes")
    card = ModelCard(fake_hub.instances[0].commits[0]["files"]["README.md"].decode())
    assert card.data.license == "bsd-3-clause" and len(card.data.eval_results) == 4


def test_results_given_at_push_time_keep_the_cards_provenance_and_recipe(fake_hub, tiny_model, results_json, tmp_path):
    # a converted checkpoint's card: the weights are NVIDIA's, under NVIDIA's license; then evaluated and pushed
    card = build_model_card(tiny_model.config, license="bsd-3-clause", dataset="cityscapes", model_name="hms-converted",
                            provenance="The weights are NVIDIA's, converted from `tiny.pth`.",
                            training_details={"trained by": "NVIDIA"})
    folder = save_for_hub(tiny_model, tmp_path / "converted", card=card)
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\n## Notes\n\nWritten by hand.\n")
    push_to_hub(folder, "someone/hms-tiny", token="hf_test", evaluation={"results": EVALUATION["results"]})
    pushed = ModelCard(fake_hub.instances[0].commits[0]["files"]["README.md"].decode())
    for kept in ("The weights are NVIDIA's, converted from `tiny.pth`.", "- trained by: NVIDIA", "Written by hand."):
        assert kept in pushed.text
    assert pushed.data.license == "bsd-3-clause" and pushed.data.datasets == ["cityscapes"]  # the card's dataset
    assert {r.metric_value for r in pushed.data.eval_results if r.metric_type == "mean_iou"} == {41.24, 45.68}
    assert pushed.text.count("## Results") == 1 and "Not evaluated yet" not in pushed.text
    assert "| **mIoU** | **41.2** | **45.7** |" in pushed.text
    assert pushed.text.index("## Results") < pushed.text.index("## How to use")
    assert 'model="someone/hms-tiny"' in pushed.text


def test_license_and_dataset_given_at_push_time_reach_a_kept_card(fake_hub, tiny_model, tmp_path):
    folder = save_for_hub(tiny_model, tmp_path / "ready")  # a card with the package's license and no dataset
    before = snapshot(folder)
    push_to_hub(folder, "someone/hms-tiny", token="hf_test", license="bsd-3-clause", dataset="mapillary")
    push_to_hub(folder, "someone/hms-tiny", token="hf_test", dataset="my street photos")
    push_to_hub(folder, "someone/hms-tiny", token="hf_test")
    cards = [ModelCard(commit["files"]["README.md"].decode()) for api in fake_hub.instances for commit in api.commits]
    assert [(card.data.license, card.data.datasets) for card in cards] == [
        ("bsd-3-clause", ["mapillary-vistas"]), ("apache-2.0", ["my-street-photos"]), ("apache-2.0", None)]
    assert cards[0].text == cards[2].text  # the card's body is kept as it was
    assert snapshot(folder) == before


def test_push_fails_early_offline(fake_hub, monkeypatch, plain_folder):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    before = snapshot(plain_folder)
    with pytest.raises(HubPublishingError, match="offline mode"):
        push_to_hub(plain_folder, "someone/hms-tiny", token="hf_test")
    assert fake_hub.instances == [] and snapshot(plain_folder) == before


def test_push_fails_early_without_a_token(fake_hub, plain_folder):
    with pytest.raises(HubPublishingError, match="no Hugging Face token"):
        push_to_hub(plain_folder, "someone/hms-tiny")
    assert fake_hub.instances == []


def test_push_never_reads_nor_publishes_pickles(fake_hub, plain_folder, monkeypatch, capsys):
    """A training run's folder holds training_args.bin (and checkpoints): published without them, never unpickled."""
    from hms_segmentation.hub import main as push_main

    torch.save({}, plain_folder / "pytorch_model.bin")
    torch.save({}, plain_folder / "training_args.bin")
    (plain_folder / "checkpoint-2").mkdir()
    torch.save({}, plain_folder / "checkpoint-2" / "optimizer.pt")
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("a pickle was loaded"))
    monkeypatch.setattr(hub, "get_token", lambda: "hf_test")
    assert push_main([str(plain_folder), "someone/hms-tiny"]) == 0
    (commit,) = fake_hub.instances[0].commits
    assert not any(name.endswith((".bin", ".pt")) or "checkpoint" in name for name in commit["files"])
    assert "not published (pickles are never loaded, checkpoints stay local): checkpoint-2/, pytorch_model.bin, " \
           "training_args.bin" in capsys.readouterr().out
    for path in plain_folder.glob("*.safetensors"):
        path.unlink()
    with pytest.raises(HubPublishingError, match=r"no \*.safetensors weights .* its pickle files \['pytorch_model.bin', "
                                                 r"'training_args.bin'\] are never loaded"):
        push_to_hub(plain_folder, "someone/hms-tiny", token="hf_test")


def test_push_refuses_weights_that_do_not_cover_the_model(fake_hub, plain_folder):
    # transformers would initialise the missing tensors at random and push would publish that model
    from safetensors.torch import load_file, save_file

    weights = load_file(plain_folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("scale_attention_head.")},
              plain_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HubPublishingError, match=r"its weights do not fit its config.json: \d+ missing tensors "
                                                 r"\(scale_attention_head\..*Nothing was written or sent"):
        push_to_hub(plain_folder, "someone/hms-tiny", token="hf_test")
    assert fake_hub.instances == []


def test_push_refuses_a_folder_of_another_model_type(fake_hub, tmp_path):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], num_attention_heads=[1],
                             decoder_hidden_size=8, num_labels=3)
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "segformer")
    with pytest.raises(HubPublishingError, match=r"config.json describes a 'segformer' model; expected an HMS model"):
        push_to_hub(tmp_path / "segformer", "someone/segformer", token="hf_test")
    assert fake_hub.instances == []


@pytest.mark.parametrize("problem, message", [
    ("other type", "its config.json describes a 'segformer' model; expected an HMS model"),
    ("no weights", "the folder has no weights (expected model.safetensors"),
    ("missing tensors",
     "its weights do not fit its config.json: 1 missing tensors (scale_attention_head.projection.weight)"),
    ("mis-shaped tensors", "its weights do not fit its config.json"),
])
def test_demo_names_a_folder_that_is_not_a_complete_hms_model_without_a_traceback(
    tiny_model, tmp_path, capsys, problem, message
):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    config, weights = json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors")
    if problem == "other type":
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "segformer"}))
    elif problem == "no weights":
        (folder / "model.safetensors").unlink()
    else:
        key = "scale_attention_head.projection.weight"
        if problem == "missing tensors":
            del weights[key]
        else:
            weights[key] = torch.zeros(*weights[key].shape[:-1], weights[key].shape[-1] + 1)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert cli_main(["demo", "--model", str(folder), "--output-dir", str(tmp_path / "demo")]) == 2
    error = capsys.readouterr().err
    assert error.splitlines()[-1].startswith(f"error: --model {folder}: ") and message in error
    assert "Traceback" not in error
    assert not (tmp_path / "demo").exists()


def test_demo_names_an_unreachable_hub_model_without_a_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli_main(["demo", "--model", "someone/no-such-hms-model", "--output-dir", str(tmp_path / "demo")]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: --model someone/no-such-hms-model could not be loaded: ")


def test_push_names_the_files_it_does_not_publish(fake_hub, plain_folder, caplog):
    push_to_hub(plain_folder, "someone/hms-tiny", token="hf_test")
    assert "not published" not in caplog.text
    (plain_folder / "LICENSE").write_text("BSD 3-Clause")
    (plain_folder / "all_results.json").write_text("{}")
    (plain_folder / "runs" / "1").mkdir(parents=True)
    (plain_folder / "runs" / "1" / "events.out").write_text("")
    torch.save({}, plain_folder / "training_args.bin")  # listed by the command, as a pickle
    with caplog.at_level("WARNING", logger="hms_segmentation.hub"):
        push_to_hub(plain_folder, "someone/hms-tiny", token="hf_test")
    published = fake_hub.instances[-1].commits[0]["files"]
    assert not {"LICENSE", "all_results.json", "runs/1/events.out"} & set(published)
    (record,) = [r for r in caplog.records if "not published" in r.getMessage()]
    assert record.getMessage().endswith(": LICENSE, all_results.json, runs/")


def test_push_refuses_an_invalid_repo_id(fake_hub, plain_folder):
    with pytest.raises(HubPublishingError, match="not a valid Hub repository id"):
        push_to_hub(plain_folder, "not a/valid//id", token="hf_test")


def test_failed_upload_leaves_nothing_behind(fake_hub, plain_folder):
    fake_hub.fail_with = ConnectionError("the Hub went away")
    before = snapshot(plain_folder)
    with pytest.raises(HubPublishingError, match="the Hub went away.*Nothing was committed"):
        push_to_hub(plain_folder, "someone/hms-tiny", token="hf_test")
    (api,) = fake_hub.instances
    assert api.staged_paths and not any(path.exists() for path in api.staged_paths)
    assert snapshot(plain_folder) == before


def test_push_command(fake_hub, plain_folder, capsys, monkeypatch):
    assert cli_main(["push", str(plain_folder), "someone/hms-tiny", "--private", "--token", "hf_test"]) == 0
    assert "https://huggingface.co/someone/hms-tiny/commit/0123abc" in capsys.readouterr().out
    assert cli_main(["push", str(plain_folder), "someone/hms-tiny", "--token", "hf_test", "--revision", "v2"]) == 0
    api = fake_hub.instances[-1]
    assert api.branches == ["v2"] and api.commits[0]["revision"] == "v2"  # the main branch above: None
    assert fake_hub.instances[0].commits[0]["revision"] is None
    # the card's code loads from that branch
    assert 'model="someone/hms-tiny", revision="v2"' in api.commits[0]["files"]["README.md"].decode()
    assert "revision=" not in fake_hub.instances[0].commits[0]["files"]["README.md"].decode()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli_main(["push", str(plain_folder), "someone/hms-tiny", "--token", "hf_test"]) == 1
    assert "offline mode" in capsys.readouterr().err


# --- converted NVIDIA checkpoints -------------------------------------------------------------------------------


def nvidia_state_dict(model: HMSForSemanticSegmentation) -> dict[str, torch.Tensor]:
    """Our state dict under the reference's key names (the converter's table read backwards; HRNet+OCR rules only)."""
    ours_to_nvidia = [(ours, nvidia) for nvidia, ours in NVIDIA_KEY_PREFIXES
                      if not nvidia.startswith("backbone.layer0")]  # the ResNet trunk's renames
    renamed = {}
    for key, tensor in model.state_dict().items():
        ours, nvidia = max(((o, n) for o, n in ours_to_nvidia if key.startswith(o)), key=lambda pair: len(pair[0]))
        renamed[nvidia + key[len(ours):]] = tensor
    return renamed


@pytest.fixture(scope="module")
def nvidia_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    model = HMSForSemanticSegmentation(HMSConfig(**{**TINY_HRNET, "num_labels": 19}))
    path = tmp_path_factory.mktemp("nvidia") / "cityscapes_ocrnet.HRNet_Mscale_tiny.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in nvidia_state_dict(model).items()}, "epoch": 3}, path)
    return path


def test_converted_checkpoint_is_a_hub_ready_folder(nvidia_checkpoint, results_json, tmp_path, capsys):
    output = tmp_path / "hms-cityscapes-tiny"
    evaluation = json.loads(results_json.read_text())
    for row in evaluation["results"]:
        row["per_category_iou"] = {name: 0.5 for name in CITYSCAPES_ID2LABEL.values()}
    (tmp_path / "results.json").write_text(json.dumps(evaluation))
    arguments = [str(nvidia_checkpoint), str(output), "--results", str(tmp_path / "results.json")]
    assert cli_main(["convert-nvidia", *arguments]) == 0
    check_hub_folder(output)
    config = AutoConfig.from_pretrained(output)
    assert config.id2label == CITYSCAPES_ID2LABEL
    card = ModelCard.load(output / "README.md")
    assert card.data.license == "bsd-3-clause" and card.data.datasets == ["cityscapes"]
    assert nvidia_checkpoint.name in card.text and "nothing is retrained" in card.text
    assert {r.metric_value for r in card.data.eval_results if r.metric_type == "mean_iou"} == {41.24, 45.68}
    assert type(AutoImageProcessor.from_pretrained(output)) is HMSImageProcessor


def test_bad_results_stop_the_conversion_before_anything_is_written(nvidia_checkpoint, tmp_path, capsys):
    (tmp_path / "results.json").write_text('{"results": [{"scales": [1.0], "mean_iou": 82.1}]}')
    output = tmp_path / "out"
    arguments = [str(nvidia_checkpoint), str(output), "--results", str(tmp_path / "results.json")]
    assert cli_main(["convert-nvidia", *arguments]) == 1
    assert "mean_iou" in capsys.readouterr().err
    assert not output.exists() or not any(output.iterdir())


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_checkpoint_pickles_are_never_executed(tmp_path):
    marker = tmp_path / "code_ran.txt"
    path = tmp_path / "malicious.pth"
    with path.open("wb") as file:
        pickle.dump({"state_dict": {"weight": torch.zeros(1)}, "payload": _RunsCodeWhenUnpickled(marker)}, file,
                    protocol=2)
    with pytest.raises(CheckpointConversionError, match="weights_only=True"):
        load_checkpoint_state_dict(path)
    assert not marker.exists()


# --- EXIF orientation in the card's usage code -------------------------------------------------------------------


def test_card_usage_code_gives_an_exif_rotated_photo_its_upright_size(hub_folder, tmp_path):
    import re

    # stored 128 wide and 64 high, shown (EXIF orientation 6) 64 wide and 128 high, as phone photos often are
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "street.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(photo, exif=exif)
    readme = (hub_folder / "README.md").read_text()
    (block,) = [block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
                if "AutoModelForSemanticSegmentation" in block]
    placeholder = 'Image.new("RGB", (256, 128), (90, 120, 150))  # or Image.open("street.jpg")'
    assert placeholder in block
    names: dict = {}
    exec(compile(block.replace(placeholder, f"Image.open({str(photo)!r})"), "README.md", "exec"), names)
    assert (names["image"].height, names["image"].width) == (64, 128)  # the stored size
    assert tuple(names["label_map"].shape) == (128, 64)  # the shown size, the processor's pixels'
