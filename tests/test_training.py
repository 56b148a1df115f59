"""The Trainer script on tiny models and a tiny synthetic dataset: arguments, loop, checkpoints, guards, fine-tuning."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch

from hms_segmentation import HMSConfig, HMSForSemanticSegmentation
from hms_segmentation.training.arguments import HMSTrainingArguments, parse_arguments
from hms_segmentation.training.train import HMSTrainer, NonFiniteLossError, run_training
from tiny_configs import TINY_HRNET, TINY_RESNET, save_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"), TINY_HRNET, num_labels=19, ocr_dropout=0.0)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic") / "data"


def ensure_tiny_synthetic(data_dir: Path) -> Path:
    from hms_segmentation.training.arguments import DataArguments
    from hms_segmentation.training.datasets import ensure_synthetic_dataset

    return ensure_synthetic_dataset(DataArguments(data_dir=str(data_dir), synthetic_train_frames=4, synthetic_val_frames=2,
                                                  synthetic_height=64, synthetic_width=128))


def tiny_run_arguments(model_dir: Path, data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--dataset", "synthetic", "--data_dir", str(data_dir),
        "--synthetic_train_frames", "4", "--synthetic_val_frames", "2", "--synthetic_height", "64",
        "--synthetic_width", "128", "--crop_size", "64", "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "2", "--max_steps", "3", "--logging_steps", "1", "--report_to", "none",
        "--use_cpu", "true", "--eval_scales", "0.5,1.0", *extra,
    ]


def test_arguments_have_the_paper_defaults(tmp_path):
    model_args, data_args, training_args = parse_arguments(["--output_dir", str(tmp_path)])
    assert (training_args.learning_rate, training_args.momentum, training_args.weight_decay) == (0.01, 0.9, 1e-4)
    assert model_args.training_scales == "0.5,1.0" and model_args.eval_scales == "0.5,1.0,2.0"
    assert model_args.primary_loss == "rmi" and data_args.dataset == "synthetic"
    assert training_args.per_device_train_batch_size == 2 and training_args.dataloader_drop_last  # not HF's 8
    assert (data_args.crop_size, data_args.crop_width, data_args.class_uniform_fraction) == (1024, None, 0.5)
    assert (data_args.color_jitter, data_args.blur_probability) == (0.25, 0.0)  # the reference's --color_aug, no --gblur


def test_optimizer_settings_are_followed_or_refused_never_silently_unused(tmp_path):
    from hms_segmentation.training.train import create_optimizer

    model = torch.nn.Linear(2, 2)

    def sgd(*flags: str) -> dict:
        group = create_optimizer(model, parse_arguments(["--output_dir", str(tmp_path), *flags])[2]).param_groups[0]
        return {key: group[key] for key in ("momentum", "nesterov", "dampening", "weight_decay")}

    assert sgd() == {"momentum": 0.9, "nesterov": False, "dampening": 0, "weight_decay": 1e-4}  # the reference's
    assert sgd("--optim_args", "nesterov=true")["nesterov"] is True  # transformers' SGD settings, as its SGD reads them
    assert sgd("--optim_args", "dampening=0.1")["dampening"] == 0.1
    assert sgd("--optim_args", "momentum=0.5")["momentum"] == 0.5
    assert sgd("--momentum", "0.7")["momentum"] == 0.7
    for flags, message in (
        (["--momentum", "0.7", "--optim_args", "momentum=0.5"], "the SGD momentum is given twice"),
        (["--optim", "adamw_torch", "--momentum", "0.5"], "--momentum 0.5 applies to --optim sgd; --optim adamw_torch"),
        (["--lr_scheduler_type", "cosine", "--poly_power", "1.0"],
         "--poly_power 1 applies to the polynomial schedule, not --lr_scheduler_type cosine"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_arguments(["--output_dir", str(tmp_path), *flags])
    assert parse_arguments(["--output_dir", str(tmp_path), "--optim", "adamw_torch"])[2].momentum is None


def test_color_jitter_blur_and_padding_reach_the_training_transform(synthetic_dir, tmp_path):
    from hms_segmentation.training.datasets import build_datasets

    ensure_tiny_synthetic(synthetic_dir)
    common = ["--output_dir", str(tmp_path), "--data_dir", str(synthetic_dir), "--synthetic_train_frames", "4",
              "--synthetic_val_frames", "2", "--synthetic_height", "64", "--synthetic_width", "128", "--crop_size", "32"]
    options = build_datasets(parse_arguments(common)[1], seed=0, do_eval=False).train.transform.options
    assert (options.brightness, options.contrast, options.saturation, options.hue) == (0.25,) * 4
    assert options.blur_probability == 0.0 and (options.pad_placement, options.pad_fill) == ("random", "mean")
    data = build_datasets(parse_arguments([*common, "--color_jitter", "0", "--blur_probability", "1", "--crop_padding",
                                           "centre", "--crop_pad_fill", "black"])[1], seed=0, do_eval=False)
    options = data.train.transform.options
    assert (options.brightness, options.contrast, options.saturation, options.hue, options.blur_probability) == (
        0, 0, 0, 0, 1)
    assert (options.pad_placement, options.pad_fill) == ("centre", "black")
    assert "color_jitter" not in data.train[0]  # nothing left to jitter on the device
    options = build_datasets(parse_arguments([*common, "--color_jitter", "0.6", "--hue_jitter", "0"])[1], seed=0,
                             do_eval=False).train.transform.options
    assert (options.brightness, options.contrast, options.saturation, options.hue) == (0.6, 0.6, 0.6, 0)


def test_crop_width_gives_the_reference_rectangular_crops(synthetic_dir, tmp_path):
    from hms_segmentation.training.datasets import build_datasets

    ensure_tiny_synthetic(synthetic_dir)
    _, data_args, _ = parse_arguments([
        "--output_dir", str(tmp_path), "--data_dir", str(synthetic_dir), "--synthetic_train_frames", "4",
        "--synthetic_val_frames", "2", "--synthetic_height", "64", "--synthetic_width", "128",
        "--crop_size", "32", "--crop_width", "64"])
    sample = build_datasets(data_args, seed=0, do_eval=False).train[0]
    assert sample["pixel_values"].shape[-2:] == (32, 64) and sample["labels"].shape == (32, 64)
    with pytest.raises(ValueError, match="--crop_width must be a positive number of pixels, got 0"):
        parse_arguments(["--output_dir", str(tmp_path), "--crop_width", "0"])


def test_arguments_read_from_yaml_and_json(tmp_path):
    values = {"output_dir": str(tmp_path / "run"), "learning_rate": 0.005, "crop_size": 512, "eval_scales": "1.0"}
    (tmp_path / "args.json").write_text(json.dumps(values))
    (tmp_path / "args.yaml").write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    for name in ("args.json", "args.yaml"):
        model_args, data_args, training_args = parse_arguments([str(tmp_path / name)])
        assert training_args.learning_rate == 0.005 and data_args.crop_size == 512 and model_args.eval_scales == "1.0"


def test_flags_after_an_argument_file_take_precedence(tmp_path):
    (tmp_path / "args.yaml").write_text(f"output_dir: {tmp_path / 'run'}\nlearning_rate: 0.005\ncrop_size: 512\n"
                                        "sync_bn: true\neval_scales: '1.0'\n")
    model_args, data_args, training_args = parse_arguments([str(tmp_path / "args.yaml"), "--learning_rate", "0.02",
                                                            "--sync_bn", "false", "--max_steps", "7"])
    assert (training_args.learning_rate, training_args.max_steps, data_args.crop_size) == (0.02, 7, 512)
    assert not model_args.sync_bn and model_args.eval_scales == "1.0"
    with pytest.raises(ValueError, match="--crop_sise"):  # a misspelt flag after the file is refused too
        parse_arguments([str(tmp_path / "args.yaml"), "--crop_sise", "256"])


@pytest.mark.parametrize("text, message", [
    ("- learning_rate\n- 0.01\n", r"bad.yaml must map argument names to values, found a list"),
    ("learning_rate: [0.01\n", r"bad.yaml is not valid YAML"),
    ("help: true\n", r"bad.yaml: no argument is named 'help'"),
    # argparse's choices hold on the command line only: a file's value is checked when parsed, not after the data
    ("train_sample_dtype: float16\n", r"--train_sample_dtype must be one of uint8, float32, got 'float16'"),
])
def test_a_bad_argument_file_is_named(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_arguments([str(tmp_path / "bad.yaml")])
    with pytest.raises(FileNotFoundError, match="argument file .*missing.json does not exist"):
        parse_arguments([str(tmp_path / "missing.json"), "--max_steps", "3"])


RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("name", ["cityscapes_sota.yaml", "mapillary.yaml"])
def test_the_shipped_recipes_parse_to_the_reference_settings(name, tiny_model_dir, tmp_path):
    """recipes/*.yaml: every key is an argument (unknown keys are refused) and holds the reference's value. Only the
    paths change here, and fp16, which TrainingArguments refuses without a GPU."""
    import yaml

    recipe = yaml.safe_load((RECIPES / name).read_text())
    # the recipe file as shipped, its paths and fp16 overridden by flags after it
    overrides = ["--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"), "--fp16", "false"]
    if "model_name_or_path" in recipe:
        overrides += ["--model_name_or_path", str(tiny_model_dir)]
    model_args, data_args, training_args = parse_arguments([str(RECIPES / name), *overrides])
    assert (data_args.data_dir, training_args.output_dir) == (str(tmp_path / "data"), str(tmp_path / "run"))
    assert not training_args.fp16
    assert model_args.primary_loss == "rmi" and model_args.sync_bn and model_args.eval_scales == "0.5,1.0,2.0"
    assert (training_args.momentum, training_args.weight_decay) == (0.9, 1e-4)
    if name == "cityscapes_sota.yaml":  # train_cityscapes_sota.yml
        assert (data_args.crop_size, data_args.crop_width, training_args.per_device_train_batch_size) == (1024, 2048, 1)
        assert (training_args.learning_rate, training_args.poly_power, training_args.num_train_epochs) == (0.01, 2, 175)
        assert data_args.auto_label_classes == "3,4,6,7,9,11,12,13,14,15,16,17,18" and data_args.auto_label_epochs == 150
        assert model_args.ignore_mismatched_sizes and data_args.blur_probability == 0
    else:  # train_mapillary.yml
        assert (data_args.pre_size, data_args.eval_long_side, data_args.blur_probability) == (2177, 2177, 1.0)
        assert (training_args.learning_rate, training_args.poly_power, training_args.num_train_epochs) == (0.005, 1, 200)
        assert model_args.preset == "hrnet_w48_ocr" and training_args.per_device_train_batch_size == 2
    assert recipe["fp16"] is True and data_args.crop_padding == "centre"  # no --translate_aug_fix in either
    assert data_args.crop_pad_fill == "black"
    assert training_args.poly_decay_unit == "epoch"  # its LambdaLR steps once per epoch
    assert training_args.eval_visuals == 10  # its ImageDumper's dump_num: 10 validation images pictured each time
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**recipe, "croop_size": 512}))
    with pytest.raises(ValueError, match=r"typo.yaml: no argument is named 'croop_size'"):  # refused, not ignored
        parse_arguments([str(tmp_path / "typo.yaml"), *overrides])


@pytest.mark.parametrize(
    "argv, message",
    [(["--dataset", "kitti"], "--dataset"), (["--dataset", "cityscapes"], "--data_dir"), (["--eval_scales", "0,1"], "--eval_scales"),
     (["--scale_min", "-1"], "--scale_min -1.0"), (["--scale_min", "2", "--scale_max", "1"], "--scale_max 1.0"),
     (["--crop_size", "0"], "--crop_size"), (["--max_train_samples", "-2"], "--max_train_samples"),
     (["--max_eval_samples", "0"], "--max_eval_samples"),
     (["--synthetic_train_frames", "0"], "--synthetic_train_frames must be at least 1, got 0"),
     (["--color_jitter", "0.6"], r"hue jitter must be in \[0, 0.5\] turns, got 0.6 \(--hue_jitter, which defaults "
                                 r"to --color_jitter\)"),
     (["--color_jitter", "-1"], "--color_jitter must be >= 0, got -1"),
     (["--hue_jitter", "0.7"], r"hue jitter must be in \[0, 0.5\] turns, got 0.7"),
     (["--blur_probability", "2"], r"--blur_probability must be in \[0, 1\], got 2"),
     # TrainingArguments that cannot apply to segmentation batches are refused by both scripts, not ignored
     (["--remove_unused_columns", "true"], "--remove_unused_columns true would drop the colour-jitter plans"),
     (["--train_sampling_strategy", "group_by_length"], "--train_sampling_strategy group_by_length groups samples"),
     (["--do_predict"], "--do_predict: these scripts have no prediction split"),
     (["--neftune_noise_alpha", "5"], "--neftune_noise_alpha works on the token embeddings"),
     (["--use_liger_kernel", "true"], "--use_liger_kernel works on the token embeddings"),
     (["--include_num_input_tokens_seen", "true"], "--include_num_input_tokens_seen works on")],
)
def test_bad_arguments_are_named(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        parse_arguments(["--output_dir", str(tmp_path), *argv])


def test_the_card_describes_the_augmentation_of_a_recipe():
    from hms_segmentation.training.arguments import DataArguments
    from hms_segmentation.training.train import augmentation_description

    recipe = DataArguments(pre_size=2177, blur_probability=1.0, crop_padding="centre", hue_jitter=0.0,
                           class_uniform_fraction=0.0)
    assert augmentation_description(recipe) == (
        "random scale 0.5-2 of a 2177-pixel long side, horizontal flip, colour jitter 0.25 (hue 0), Gaussian blur on "
        "100% of the crops, frames smaller than the crop placed centred and padded with the mean colour")
    assert augmentation_description(DataArguments(crop_pad_fill="black")).endswith("padded with black")


def test_a_bad_crop_padding_from_a_file_is_named(tmp_path):
    (tmp_path / "recipe.yaml").write_text(f"output_dir: {tmp_path / 'run'}\ncrop_padding: middle\n")
    with pytest.raises(ValueError, match="--crop_padding must be random or centre, got 'middle'"):
        parse_arguments([str(tmp_path / "recipe.yaml")])


def test_an_output_dir_that_is_a_file_is_refused_and_kept(tiny_model_dir, synthetic_dir, tmp_path):
    output = tmp_path / "notes.txt"
    output.write_text("keep me")
    with pytest.raises(FileExistsError, match=r"--output_dir .*notes\.txt is a file; expected a folder"):
        run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, output, "--do_train")))
    assert output.read_text() == "keep me"


def test_trainer_trains_logs_loss_terms_and_evaluates(tiny_model_dir, synthetic_dir, tmp_path):
    output_dir = tmp_path / "run"
    argv = tiny_run_arguments(tiny_model_dir, synthetic_dir, output_dir, "--do_train", "--do_eval")
    metrics = run_training(*parse_arguments(argv))
    assert 0 <= metrics["eval_mean_iou"] <= 1 and "eval_overall_accuracy" in metrics
    state = json.loads((output_dir / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert {"loss_main", "loss_auxiliary", "loss_scale_0.5", "loss_scale_1.0"} <= set(logged[0])
    assert (output_dir / "model.safetensors").exists()
    trained = HMSForSemanticSegmentation.from_pretrained(output_dir)
    assert trained.config.inference_scales == [0.5, 1.0]
    assert not torch.equal(trained.state_dict()["decode_head.classifier.weight"],
                           HMSForSemanticSegmentation.from_pretrained(tiny_model_dir).state_dict()["decode_head.classifier.weight"])
    # a complete model folder: image processor and a card with the recipe and the final evaluation
    from huggingface_hub import ModelCard

    from hms_segmentation import HMSImageProcessor
    from hms_segmentation.hub import check_hub_folder

    assert isinstance(HMSImageProcessor.from_pretrained(output_dir), HMSImageProcessor)
    card = ModelCard.load(output_dir / "README.md")
    (result,) = [r for r in card.data.eval_results if r.metric_type == "mean_iou"]
    assert result.metric_value == round(100 * metrics["eval_mean_iou"], 2) and result.dataset_split == "val"
    assert f"started from: {tiny_model_dir}" in card.text and "optimizer steps: 3" in card.text
    assert "images per step: 2" in card.text and "crop: 64x64" in card.text
    assert ("augmentation: random scale 0.5-2, horizontal flip, colour jitter 0.25 (hue 0.25), 50% of the crops "
            "class-uniform, frames smaller than the crop placed at random and padded with the mean colour") in card.text
    assert "optimizer: SGD (momentum 0.9), learning rate 0.01, weight decay 0.0001, poly decay (power 2.0)" in card.text
    with pytest.raises(Exception, match="pickle files"):  # training_args.bin: `push` re-saves only the model files
        check_hub_folder(output_dir)


@pytest.mark.parametrize("script", ["trainer", "accelerate"])
def test_push_to_hub_publishes_the_finished_model_folder(script, tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    """--push_to_hub: checked before training, then one commit of the model folder (never training_args.bin or a
    checkpoint), as `hms-segmentation push` makes it; the Trainer's own repository and pushes stay off."""
    from fake_hub import install_fake_hub

    from hms_segmentation.hub import HubPublishingError
    from hms_segmentation.training import train_accelerate

    run = run_training if script == "trainer" else train_accelerate.run_training
    argv = tiny_run_arguments(tiny_model_dir, synthetic_dir, tmp_path / "run", "--do_train", "--push_to_hub",
                              "--hub_model_id", "someone/hms-tiny", "--save_steps", "2")
    with pytest.raises(HubPublishingError, match="offline mode"):  # HF_HUB_OFFLINE=1: before any training
        run(*parse_arguments(argv))
    assert not (tmp_path / "run" / "model.safetensors").exists()
    fake_hub = install_fake_hub(monkeypatch)
    with pytest.raises(HubPublishingError, match="no Hugging Face token"):
        run(*parse_arguments(argv))
    with pytest.raises(ValueError, match="--hub_strategy checkpoint: checkpoints are never published"):
        run(*parse_arguments([*argv, "--hub_token", "hf_test", "--hub_strategy", "checkpoint"]))
    with pytest.raises(ValueError, match="--push_to_hub publishes the model this run trains: it needs --do_train"):
        run(*parse_arguments([arg for arg in argv if arg != "--do_train"] + ["--hub_token", "hf_test"]))
    run(*parse_arguments([*argv, "--hub_token", "hf_test", "--overwrite_output_dir", "true", "--hub_revision", "v2"]))
    (api,) = fake_hub.instances
    (commit,) = api.commits
    assert api.branches == ["v2"] and commit["revision"] == "v2"  # --hub_revision: that branch
    assert api.repos == [{"repo_id": "someone/hms-tiny", "private": False, "exist_ok": True}]
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= set(commit["files"])
    assert not any(name.endswith(".bin") or name.startswith("checkpoint") for name in commit["files"])
    assert 'model="someone/hms-tiny", revision="v2"' in commit["files"]["README.md"].decode()


def test_accelerate_script_reports_to_trackers(tiny_model_dir, synthetic_dir, tmp_path):
    """--report_to goes to accelerate's trackers: hyperparameters once (tokens redacted), each log and evaluation at
    its step; integrations accelerate lacks are named."""
    from accelerate.tracking import GeneralTracker

    from hms_segmentation.training import train_accelerate

    class RecordingTracker(GeneralTracker):
        name, requires_logging_directory, main_process_only = "recording", False, True

        def __init__(self):
            super().__init__()
            self.config, self.logged, self.finished = None, [], False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    argv = tiny_run_arguments(tiny_model_dir, synthetic_dir, tmp_path / "run", "--do_train", "--do_eval",
                              "--eval_strategy", "steps", "--eval_steps", "3", "--hub_token", "hf_secret")
    model_args, data_args, training_args = parse_arguments(argv)
    tracker = RecordingTracker()
    training_args.report_to = [tracker]
    train_accelerate.run_training(model_args, data_args, training_args)
    assert tracker.config["learning_rate"] == 0.01 and tracker.config["crop_size"] == 64
    assert "hf_secret" not in json.dumps(tracker.config)
    steps = [step for step, values in tracker.logged if "loss" in values]
    assert steps == [1, 2, 3] and "loss_main" in tracker.logged[0][1] and "learning_rate" in tracker.logged[0][1]
    assert any(step == 3 and "eval_mean_iou" in values for step, values in tracker.logged) and tracker.finished
    training_args.report_to = ["neptune"]
    with pytest.raises(ValueError, match="--report_to neptune: this script reports through accelerate"):
        train_accelerate.run_training(model_args, data_args, training_args)


@pytest.mark.parametrize("flags, logged_steps, evaluated_steps", [
    (("--logging_strategy", "no"), [], []),
    (("--logging_strategy", "epoch", "--max_steps", "-1", "--num_train_epochs", "2"), [2, 4], []),
    (("--eval_on_start", "true"), [1, 2, 3], [0]),
], ids=["no_logging", "epoch_logging", "eval_on_start"])
def test_accelerate_script_follows_logging_strategy_and_eval_on_start(tiny_model_dir, synthetic_dir, tmp_path, flags,
                                                                       logged_steps, evaluated_steps):
    from hms_segmentation.training import train_accelerate

    output = tmp_path / "run"
    argv = tiny_run_arguments(tiny_model_dir, synthetic_dir, output, "--do_train", "--do_eval", *flags)
    train_accelerate.run_training(*parse_arguments(argv))
    history = json.loads((output / "log_history.json").read_text())
    assert [entry["step"] for entry in history if "loss" in entry] == logged_steps
    assert [entry["step"] for entry in history if "eval_mean_iou" in entry] == evaluated_steps  # during training
    assert "eval_mean_iou" in json.loads((output / "all_results.json").read_text())  # and the final one


@pytest.mark.parametrize("script", ["trainer", "accelerate"])
def test_first_step_logging_and_eval_delay_are_followed_as_the_trainer_does(tiny_model_dir, synthetic_dir, tmp_path,
                                                                             script, monkeypatch):
    from hms_segmentation.training import train_accelerate

    output = tmp_path / "run"
    argv = tiny_run_arguments(tiny_model_dir, synthetic_dir, output, "--do_train", "--do_eval", "--logging_steps", "2",
                              "--logging_first_step", "true", "--eval_strategy", "steps", "--eval_steps", "1",
                              "--eval_delay", "2", "--disable_tqdm", "true", "--torch_empty_cache_steps", "1",
                              "--dataloader_pin_memory", "false", "--data_seed", "5", "--log_level", "warning",
                              "--full_determinism", "true")
    seeded = []  # --full_determinism: deterministic algorithms, process-wide, so recorded here rather than switched on
    monkeypatch.setattr("transformers.trainer.enable_full_determinism", seeded.append)
    monkeypatch.setattr(train_accelerate, "enable_full_determinism", seeded.append)
    (run_training if script == "trainer" else train_accelerate.run_training)(*parse_arguments(argv))
    assert seeded and set(seeded) == {42}
    history = logged_history(output, script)
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2]
    assert [entry["step"] for entry in history if "eval_mean_iou" in entry] == [2, 3]


@pytest.mark.parametrize("script", ["trainer", "accelerate"])
def test_eval_visuals_picture_the_same_images_at_each_evaluation(tiny_model_dir, synthetic_dir, tmp_path, script):
    from hms_segmentation.training import train_accelerate

    output = tmp_path / "run"
    # the Trainer keeps every evaluation's pictures here; train-accelerate, by default, the latest only
    keep = ("--eval_visuals_keep", "0") if script == "trainer" else ()
    argv = tiny_run_arguments(tiny_model_dir, synthetic_dir, output, "--do_train", "--do_eval", "--eval_strategy",
                              "steps", "--eval_steps", "2", "--eval_visuals", "1", *keep)
    (output / "visuals").mkdir(parents=True)
    (output / "visuals" / "notes.txt").write_text("mine")  # not a step folder: never removed
    (run_training if script == "trainer" else train_accelerate.run_training)(*parse_arguments(
        [*argv, "--overwrite_output_dir"]))
    steps = [2, 3] if script == "trainer" else [3]  # during and after training
    assert sorted(p.name for p in (output / "visuals").iterdir()) == ["notes.txt"] + [f"step-{s}" for s in steps]
    for step in steps:
        pictures = sorted(p.name for p in (output / "visuals" / f"step-{step}").iterdir())
        assert len(pictures) == 9 + 1 and pictures[1].endswith("_attn_0.5x.png") and pictures[0] == "index.html"
        assert f"step {step}" in (output / "visuals" / f"step-{step}" / "index.html").read_text()
    with pytest.raises(ValueError, match="--eval_visuals must be >= 0"):
        parse_arguments([*argv, "--eval_visuals", "-1"])
    with pytest.raises(ValueError, match="--eval_visuals_keep must be >= 0"):
        parse_arguments([*argv, "--eval_visuals_keep", "-1"])


def test_trainer_evaluates_a_model_cast_to_bf16(tiny_model_dir, synthetic_dir, tmp_path):
    """--bf16_full_eval: the Trainer casts the model (not the batches) to bfloat16; the figures stay close and the
    --eval_visuals pictures are made of the cast model."""
    argv = tiny_run_arguments(tiny_model_dir, synthetic_dir, tmp_path / "fp32", "--do_eval")
    full = run_training(*parse_arguments(argv))
    argv = tiny_run_arguments(tiny_model_dir, synthetic_dir, tmp_path / "bf16", "--do_eval", "--bf16_full_eval", "true",
                              "--eval_visuals", "1")
    half = run_training(*parse_arguments(argv))
    assert half["eval_mean_iou"] == pytest.approx(full["eval_mean_iou"], abs=0.02)
    assert len(list((tmp_path / "bf16" / "visuals" / "step-0").glob("*.png"))) == 9


@pytest.mark.parametrize("flags", [
    ("--save_only_model", "true"), ("--fp16_full_eval", "true"), ("--eval_accumulation_steps", "2"),
    ("--auto_find_batch_size", "true", "--skip_memory_metrics", "false"),
], ids=["save_only_model", "fp16_full_eval", "eval_accumulation_steps", "two_flags"])
def test_accelerate_script_refuses_what_it_does_not_follow(tiny_model_dir, synthetic_dir, tmp_path, flags):
    """Every TrainingArguments flag is followed by the explicit loop or refused there, never ignored."""
    import dataclasses

    from hms_segmentation.training import train_accelerate

    assert train_accelerate.FOLLOWED_TRAINING_ARGUMENTS <= {field.name for field in dataclasses.fields(HMSTrainingArguments)}
    output = tmp_path / "run"
    argv = tiny_run_arguments(tiny_model_dir, synthetic_dir, output, "--do_train")
    train_accelerate.check_followed_arguments(parse_arguments(argv)[2])  # the defaults (and these) pass
    named = ", ".join(f"{name} {value}" for name, value in zip(flags[::2], flags[1::2]))
    with pytest.raises(ValueError, match=named.replace("true", "True").replace("false", "False") + ": this script does not follow"):
        train_accelerate.run_training(*parse_arguments([*argv, *flags]))
    assert not output.exists()


def test_accelerate_script_passes_ddp_and_dataloader_flags_on():
    from hms_segmentation.training import train_accelerate

    def ddp(*flags):
        options = train_accelerate._ddp_options(parse_arguments(["--output_dir", "unused", *flags])[2])
        return (options.find_unused_parameters, options.bucket_cap_mb, options.static_graph, options.broadcast_buffers)

    assert ddp() == (True, 25, False, True)  # unused parameters looked for: the Trainer's default for a PreTrainedModel
    assert ddp("--activation_checkpointing", "true")[0] is False
    assert ddp("--ddp_find_unused_parameters", "false", "--ddp_bucket_cap_mb", "50", "--ddp_static_graph", "true",
               "--ddp_broadcast_buffers", "false") == (False, 50, True, False)
    options = train_accelerate._loader_options(parse_arguments([
        "--output_dir", "unused", "--dataloader_num_workers", "2", "--dataloader_pin_memory", "false",
        "--dataloader_persistent_workers", "true", "--dataloader_prefetch_factor", "4",
        "--dataloader_multiprocessing_context", "spawn", "--dataloader_in_order", "false"])[2])
    loader = torch.utils.data.DataLoader(list(range(4)), **options)
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers, loader.prefetch_factor,
            loader.in_order) == (2, False, True, 4, False)
    assert loader.multiprocessing_context.get_start_method() == "spawn"


def test_accelerate_script_without_do_train_evaluates_the_model_as_given(tiny_model_dir, synthetic_dir, tmp_path):
    from hms_segmentation.training import train_accelerate

    common = ("--do_eval", "--report_to", "none")
    by_trainer = run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, tmp_path / "t", *common)))
    by_accelerate = train_accelerate.run_training(*parse_arguments(tiny_run_arguments(
        tiny_model_dir, synthetic_dir, tmp_path / "a", *common)))
    assert by_accelerate["eval_mean_iou"] == pytest.approx(by_trainer["eval_mean_iou"])
    assert json.loads((tmp_path / "a" / "all_results.json").read_text())["eval_mean_iou"] == by_accelerate["eval_mean_iou"]
    assert not (tmp_path / "a" / "model.safetensors").exists()  # nothing trained, nothing saved


def test_log_level_flags_set_this_package_and_transformers_logging(tmp_path):
    import logging

    import transformers

    from hms_segmentation.training.train import configure_logging

    package = logging.getLogger("hms_segmentation")
    before = package.level, transformers.utils.logging.get_verbosity()
    try:
        configure_logging(parse_arguments(["--output_dir", str(tmp_path)])[2])
        assert package.level == logging.INFO and transformers.utils.logging.get_verbosity() == before[1]  # passive
        configure_logging(parse_arguments(["--output_dir", str(tmp_path), "--log_level", "error"])[2])
        assert package.level == logging.ERROR == transformers.utils.logging.get_verbosity()
    finally:
        package.setLevel(before[0])
        transformers.utils.logging.set_verbosity(before[1])


def test_optimizer_and_schedule_flags_are_honoured(tiny_model_dir):
    """Defaults: the reference's SGD and poly decay. --optim / --lr_scheduler_type: transformers' own, over the same
    parameter groups (the trunk LR multiplier kept); flags that cannot apply are refused."""
    import math

    from hms_segmentation.training.train import create_optimizer, create_scheduler

    model = HMSForSemanticSegmentation.from_pretrained(tiny_model_dir)
    _, _, default = parse_arguments(["--output_dir", "unused"])
    sgd = create_optimizer(model, default, trunk_multiplier=0.1)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    assert [group["lr"] for group in sgd.param_groups] == [0.01, 0.001]
    poly = create_scheduler(sgd, default, total_steps=10)
    for _ in range(5):
        sgd.step(), poly.step()
    assert poly.get_last_lr()[0] == pytest.approx(0.01 * 0.5 ** 2)
    _, _, chosen = parse_arguments(["--output_dir", "unused", "--optim", "adamw_torch", "--lr_scheduler_type", "cosine",
                                    "--weight_decay", "0.05"])
    adamw = create_optimizer(model, chosen, trunk_multiplier=0.1)
    assert type(adamw) is torch.optim.AdamW and [group["lr"] for group in adamw.param_groups] == [0.01, 0.001]
    assert adamw.defaults["weight_decay"] == 0.05
    cosine = create_scheduler(adamw, chosen, total_steps=10)
    for _ in range(5):
        adamw.step(), cosine.step()
    assert cosine.get_last_lr()[0] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    with pytest.raises(ValueError, match="--label_smoothing_factor 0.1 does not apply"):
        parse_arguments(["--output_dir", "unused", "--label_smoothing_factor", "0.1"])
    with pytest.raises(ValueError, match="its power is --poly_power"):
        parse_arguments(["--output_dir", "unused", "--lr_scheduler_kwargs", '{"power": 3}'])


@pytest.mark.parametrize("script", ["trainer", "accelerate"])
def test_poly_decay_per_epoch_holds_the_lr_through_each_epoch(tiny_model_dir, synthetic_dir, tmp_path, script):
    """--poly_decay_unit epoch: the reference's schedule, its LambdaLR stepped once at the end of each epoch."""
    from hms_segmentation.training import train_accelerate

    # 4 frames in batches of 2 over 3 epochs: 2 optimizer steps per epoch (one per epoch when accumulating 2)
    for accumulation, steps_per_epoch in (("1", 2), ("2", 1)):
        output_dir = tmp_path / f"{script}_{accumulation}"
        arguments = parse_arguments(tiny_run_arguments(
            tiny_model_dir, synthetic_dir, output_dir, "--do_train", "--primary_loss", "cross_entropy", "--max_steps",
            "-1", "--num_train_epochs", "3", "--poly_decay_unit", "epoch", "--gradient_accumulation_steps", accumulation))
        (run_training if script == "trainer" else train_accelerate.run_training)(*arguments)
        expected = [0.01 * (1 - epoch / 3) ** 2 for epoch in range(3) for _ in range(steps_per_epoch)]
        assert logged_learning_rates(output_dir, script) == pytest.approx(expected)
        assert "poly decay (power 2.0) once per epoch" in (output_dir / "README.md").read_text()


def test_poly_decay_per_epoch_refuses_what_it_cannot_follow(tiny_model_dir):
    from hms_segmentation.training.train import create_optimizer, create_scheduler

    with pytest.raises(ValueError, match="applies to the polynomial schedule, not --lr_scheduler_type cosine"):
        parse_arguments(["--output_dir", "unused", "--poly_decay_unit", "epoch", "--lr_scheduler_type", "cosine"])
    with pytest.raises(ValueError, match="which has no warmup; got --warmup_steps 10"):
        parse_arguments(["--output_dir", "unused", "--poly_decay_unit", "epoch", "--warmup_steps", "10"])
    with pytest.raises(ValueError, match="--poly_decay_unit must be one of step, epoch, got 'iteration'"):
        HMSTrainingArguments(output_dir="unused", poly_decay_unit="iteration")
    with pytest.raises(ValueError, match="a streamed training set has no epoch length"):
        parse_arguments(["--output_dir", "unused", "--poly_decay_unit", "epoch", "--streaming"])
    _, _, per_epoch = parse_arguments(["--output_dir", "unused", "--poly_decay_unit", "epoch"])
    sgd = create_optimizer(HMSForSemanticSegmentation.from_pretrained(tiny_model_dir), per_epoch)
    with pytest.raises(ValueError, match="a streamed training set has no epoch length"):
        create_scheduler(sgd, per_epoch, total_steps=10, steps_per_epoch=None)
    # 10 steps of 4 per epoch begin 3 epochs; the last epoch is cut short, as the reference's --max_iter would
    schedule = create_scheduler(sgd, per_epoch, total_steps=10, steps_per_epoch=4)
    rates = []
    for _ in range(10):
        rates.append(schedule.get_last_lr()[0])
        sgd.step(), schedule.step()
    assert rates == pytest.approx([0.01] * 4 + [0.01 * (2 / 3) ** 2] * 4 + [0.01 * (1 / 3) ** 2] * 2)


def test_a_non_empty_output_folder_is_not_overwritten(tiny_model_dir, synthetic_dir, tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "results.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, output_dir, "--do_train")))
    assert (output_dir / "results.txt").read_text() == "keep me"


def test_non_finite_loss_stops_with_the_step(tiny_model_dir, tmp_path):
    model = HMSForSemanticSegmentation.from_pretrained(tiny_model_dir)
    _, _, training_args = parse_arguments(["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "true"])
    trainer = HMSTrainer(model=model, args=training_args)
    inputs = {"pixel_values": torch.full((2, 3, 64, 64), float("nan")), "labels": torch.zeros(2, 64, 64, dtype=torch.long)}
    model.train()
    with pytest.raises(NonFiniteLossError, match="step 1"):
        trainer.compute_loss(model, inputs)
    training_args.stop_on_nonfinite_loss = False
    loss = trainer.compute_loss(model, inputs)
    assert loss.item() == 0 and trainer.skipped_nonfinite_steps == 1


@pytest.mark.parametrize("script", ["trainer", "accelerate"])
def test_a_skipped_non_finite_step_leaves_weights_and_batchnorm_statistics_finite(script, tiny_model_dir, synthetic_dir,
                                                                                   tmp_path, monkeypatch, caplog):
    """--stop_on_nonfinite_loss false: a batch whose forward is non-finite (here: a NaN image at step 2) must add
    nothing; back-propagating its loss times zero gave NaN gradients (0 x inf) and NaN weights after the step."""
    from hms_segmentation.training import train as train_module
    from hms_segmentation.training import train_accelerate

    module = train_module if script == "trainer" else train_accelerate
    normalize, calls = module.normalize_uint8_pixel_values, []

    def poisoned(inputs):
        inputs = normalize(inputs)
        calls.append(1)
        if len(calls) == 2:  # the second training batch
            inputs = {**inputs, "pixel_values": torch.full_like(inputs["pixel_values"], float("nan"))}
        return inputs

    monkeypatch.setattr(module, "normalize_uint8_pixel_values", poisoned)
    output = tmp_path / "run"
    argv = tiny_run_arguments(tiny_model_dir, synthetic_dir, output, "--do_train", "--stop_on_nonfinite_loss", "false")
    (run_training if script == "trainer" else train_accelerate.run_training)(*parse_arguments(argv))
    assert len(calls) == 3
    trained = HMSForSemanticSegmentation.from_pretrained(output).state_dict()
    not_finite = [name for name, tensor in trained.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    assert not not_finite, not_finite[:5]
    history = json.loads((output / ("trainer_state.json" if script == "trainer" else "log_history.json")).read_text())
    history = history["log_history"] if script == "trainer" else history
    assert max(entry.get("skipped_nonfinite_steps", 0) for entry in history) == 1
    # the skipped step's gradients are zero and its batch statistics are undone
    model = HMSForSemanticSegmentation.from_pretrained(tiny_model_dir).train()
    before = train_module.saved_buffers(model)
    nan_batch = torch.full((2, 3, 64, 64), float("nan"))
    assert not torch.isfinite(model(nan_batch, labels=torch.zeros(2, 64, 64, dtype=torch.long)).loss)
    train_module.skip_nonfinite_step(model, before).backward()
    assert all(torch.equal(buffer, saved) for buffer, saved in zip(model.buffers(), before))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters() if p.requires_grad)


def test_a_weights_only_checkpoint_is_refused_for_resuming(tiny_model_dir, synthetic_dir, tmp_path):
    """--save_only_model checkpoints have no optimizer or scheduler state: resuming from one restarted the poly
    schedule at full LR mid-run and lost the momentum, without a word."""
    output = tmp_path / "run"
    argv = tiny_run_arguments(tiny_model_dir, synthetic_dir, output, "--do_train", "--max_steps", "2", "--save_steps",
                              "2", "--save_only_model", "true")
    run_training(*parse_arguments(argv))
    assert (output / "checkpoint-2" / "trainer_state.json").is_file()
    longer = [*argv, "--max_steps", "4"]
    with pytest.raises(ValueError, match=r"would resume from its last checkpoint, .*checkpoint-2: the checkpoint holds "
                                         r"the weights only \(saved with --save_only_model\)"):
        run_training(*parse_arguments(longer))
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .*checkpoint-2: the checkpoint holds the weights"):
        run_training(*parse_arguments([*longer, "--output_dir", str(tmp_path / "other"), "--resume_from_checkpoint",
                                       str(output / "checkpoint-2")]))


def test_fine_tuning_to_another_label_set_keeps_trunk_and_attention(tiny_model_dir, synthetic_dir, tmp_path):
    from hms_segmentation.training.arguments import ModelArguments
    from hms_segmentation.training.train import build_model

    id2label = {i: f"class_{i}" for i in range(5)}
    model = build_model(ModelArguments(model_name_or_path=str(tiny_model_dir), ignore_mismatched_sizes=True), id2label)
    original = HMSForSemanticSegmentation.from_pretrained(tiny_model_dir).state_dict()
    state = model.state_dict()
    assert model.config.num_labels == 5 and state["decode_head.classifier.weight"].shape[0] == 5
    assert state["decode_head.soft_region_head.1.weight"].shape[0] == 5
    for key in ("backbone.conv1.weight", "scale_attention_head.projection.weight", "decode_head.pixel_projection.conv.weight"):
        assert torch.equal(state[key], original[key]), key
    with pytest.raises(ValueError, match=r"predicts 19 classes, the dataset has 5: pass --ignore_mismatched_sizes"):
        build_model(ModelArguments(model_name_or_path=str(tiny_model_dir)), id2label)


@pytest.mark.parametrize("schedule", [
    (),
    ("--gradient_accumulation_steps", "2"),
    # by epochs: 4 frames in batches of 2 are 2 batches, less than the 3 accumulated: 1 (short) step per epoch
    ("--max_steps", "-1", "--num_train_epochs", "3", "--gradient_accumulation_steps", "3"),
    ("--optim", "adamw_torch", "--lr_scheduler_type", "cosine", "--warmup_steps", "1", "--learning_rate", "0.001"),
    ("--activation_checkpointing", "true"),
    ("--train_sampling_strategy", "random", "--data_seed", "7"),  # the seedable sampler draws the Trainer's order
    ("--max_steps", "-1", "--num_train_epochs", "2", "--poly_decay_unit", "epoch"),
], ids=["steps", "accumulated", "epochs", "adamw_cosine", "checkpointing", "random_data_seed", "poly_per_epoch"])
def test_accelerate_script_matches_the_trainer_on_the_same_seed(tiny_model_dir, synthetic_dir, tmp_path, schedule):
    from hms_segmentation.training import train_accelerate

    common = ("--do_train", "--train_sampling_strategy", "sequential", "--primary_loss", "cross_entropy", *schedule)
    trainer_dir, accelerate_dir = tmp_path / "trainer", tmp_path / "accelerate"
    run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, trainer_dir, *common)))
    train_accelerate.run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, accelerate_dir, *common)))
    by_trainer = HMSForSemanticSegmentation.from_pretrained(trainer_dir).state_dict()
    by_accelerate = HMSForSemanticSegmentation.from_pretrained(accelerate_dir).state_dict()
    initial = HMSForSemanticSegmentation.from_pretrained(tiny_model_dir).state_dict()
    assert not torch.equal(by_trainer["decode_head.classifier.weight"], initial["decode_head.classifier.weight"])
    for key, value in by_trainer.items():
        torch.testing.assert_close(by_accelerate[key], value, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    trainer_losses = [e["loss"] for e in json.loads((trainer_dir / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    accelerate_losses = [e["loss"] for e in json.loads((accelerate_dir / "log_history.json").read_text())]
    assert trainer_losses == pytest.approx(accelerate_losses, rel=1e-4)
    assert logged_learning_rates(accelerate_dir, "accelerate") == pytest.approx(logged_learning_rates(trainer_dir, "trainer"))
    for folder in (trainer_dir, accelerate_dir):  # both end with the image processor and a card (not evaluated here)
        assert (folder / "preprocessor_config.json").is_file() and "Not evaluated yet" in (folder / "README.md").read_text()


def test_both_scripts_draw_the_same_dropout_masks_on_one_seed(synthetic_dir, tmp_path):
    """The Trainer seeds again once the model is built (Trainer.__init__); the Accelerate script must too, or a model
    with dropout (the presets' OCR head: 0.05) trains differently in the two."""
    from hms_segmentation.training import train_accelerate

    def arguments(output_dir: Path) -> list[str]:  # a preset: built from random numbers, then trained with dropout
        argv = tiny_run_arguments(Path("unused"), synthetic_dir, output_dir, "--do_train", "--train_sampling_strategy",
                                  "sequential", "--primary_loss", "cross_entropy", "--max_steps", "2")
        return ["--preset", "hrnet_small_ocr", *argv[2:]]  # without --model_name_or_path

    trainer_dir, accelerate_dir = tmp_path / "trainer", tmp_path / "accelerate"
    run_training(*parse_arguments(arguments(trainer_dir)))
    train_accelerate.run_training(*parse_arguments(arguments(accelerate_dir)))
    trainer_losses = [e["loss"] for e in json.loads((trainer_dir / "trainer_state.json").read_text())["log_history"]
                      if "loss" in e]
    accelerate_losses = [e["loss"] for e in json.loads((accelerate_dir / "log_history.json").read_text())]
    assert trainer_losses == pytest.approx(accelerate_losses, rel=1e-4)


@pytest.mark.parametrize("script", ["trainer", "accelerate"])
def test_torch_compile_trains_as_the_uncompiled_run_and_saves_plain_weights(tiny_model_dir, synthetic_dir, tmp_path,
                                                                             script):
    """--torch_compile (here --torch_compile_backend eager: Dynamo's tracing without code generation, seconds on a
    CPU) in both scripts: the training forward, RMI loss included, compiles without a graph break, trains as the
    uncompiled run does, and checkpoints and the saved model keep the model's own parameter names."""
    import torch._dynamo
    from safetensors import safe_open
    from torch._dynamo.utils import counters

    from hms_segmentation.training import train_accelerate

    train = run_training if script == "trainer" else train_accelerate.run_training
    common = ("--do_train", "--train_sampling_strategy", "sequential", "--save_steps", "2")
    plain_dir, compiled_dir = tmp_path / "plain", tmp_path / "compiled"
    train(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, plain_dir, *common)))
    torch._dynamo.reset()
    counters.clear()
    try:
        train(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, compiled_dir, *common,
                                                  "--torch_compile_backend", "eager")))
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    initial, plain, compiled = (HMSForSemanticSegmentation.from_pretrained(folder).state_dict()
                                for folder in (tiny_model_dir, plain_dir, compiled_dir))
    # The same training up to rounding, which RMI's inverse of near-singular covariances amplifies (its gradient is
    # float32-accurate to about 1e-5 either way; 3 steps then differ by about 1e-3 of the update)
    keys = [key for key, value in initial.items() if value.is_floating_point()]
    plain_update, compiled_update = (torch.cat([(state[key] - initial[key]).flatten() for key in keys])
                                     for state in (plain, compiled))
    assert (compiled_update - plain_update).norm() <= 5e-3 * plain_update.norm()
    with safe_open(str(compiled_dir / "checkpoint-2" / "model.safetensors"), "pt") as checkpoint:
        assert set(checkpoint.keys()) == set(plain)  # no `_orig_mod.` prefixes
    plain_losses, compiled_losses = ([entry["loss"] for entry in logged_history(folder, script) if "loss" in entry]
                                     for folder in (plain_dir, compiled_dir))
    assert len(plain_losses) == 3 and compiled_losses == pytest.approx(plain_losses, rel=1e-4)


@pytest.fixture(scope="module")
def tiny_deeplab_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_deeplab"), TINY_RESNET, num_labels=19)


@pytest.mark.parametrize("script", ["trainer", "accelerate"])
def test_an_epoch_ending_in_a_batch_of_one_trains_deeplab_and_evaluation_keeps_every_image(
        tiny_deeplab_dir, synthetic_dir, tmp_path, script):
    # 4 frames in batches of 3 end each epoch with a batch of one, which DeepLabV3+'s image-pooling BatchNorm cannot
    # train on (Cityscapes' 2975 frames in batches of 2 do that too): the reference drops it, and so do we
    from hms_segmentation.training import train_accelerate

    output_dir = tmp_path / script
    arguments = parse_arguments(tiny_run_arguments(
        tiny_deeplab_dir, synthetic_dir, output_dir, "--do_train", "--do_eval", "--max_steps", "-1",
        "--num_train_epochs", "2", "--per_device_train_batch_size", "3", "--per_device_eval_batch_size", "3"))
    assert arguments[2].dataloader_drop_last
    evaluated_batches = []
    original_forward = HMSForSemanticSegmentation.forward

    @functools.wraps(original_forward)  # the Trainer finds `labels` in the signature
    def recording_forward(model, pixel_values, *args, **kwargs):
        if not model.training:
            evaluated_batches.append(len(pixel_values))
        return original_forward(model, pixel_values, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HMSForSemanticSegmentation, "forward", recording_forward)
        metrics = (run_training if script == "trainer" else train_accelerate.run_training)(*arguments)
    assert 0 <= metrics["eval_mean_iou"] <= 1
    assert evaluated_batches == [2]  # both val frames, in the one (incomplete) batch evaluation must keep
    if script == "trainer":
        assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 2  # one step per epoch
    else:
        assert len(logged_learning_rates(output_dir, "accelerate")) == 2


def test_a_training_split_smaller_than_one_batch_is_refused(tiny_model_dir, synthetic_dir, tmp_path):
    arguments = parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, tmp_path / "run", "--do_train",
                                                   "--per_device_train_batch_size", "5"))
    with pytest.raises(ValueError, match=r"4 sample\(s\), fewer than one full batch .*"
                                         r"--per_device_train_batch_size 5 x 1 process.*--dataloader_drop_last false"):
        run_training(*arguments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["trainer", "accelerate"])
def test_bf16_mixed_precision_trains_both_scripts(tiny_model_dir, synthetic_dir, tmp_path, script):
    from hms_segmentation.training import train_accelerate

    output_dir = tmp_path / script
    arguments = parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, output_dir, "--do_train", "--bf16", "true",
                                                   "--max_steps", "2", "--class_uniform_fraction", "0"))
    autocast_dtypes = []  # of every training forward of the trunk (the model's own forward is what gets wrapped)
    initial = HMSForSemanticSegmentation.from_pretrained(tiny_model_dir)
    trunk_class = type(initial.backbone)

    def record_autocast(module, inputs):
        if isinstance(module, trunk_class) and module.training:
            autocast_dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record_autocast)
    try:
        (run_training if script == "trainer" else train_accelerate.run_training)(*arguments)
    finally:
        handle.remove()
    assert autocast_dtypes == [torch.bfloat16] * 4  # 2 steps x 2 training scales
    trained = HMSForSemanticSegmentation.from_pretrained(output_dir).state_dict()
    initial = initial.state_dict()
    assert trained["decode_head.classifier.weight"].dtype == torch.float32  # master weights stay float32
    assert not torch.equal(trained["decode_head.classifier.weight"], initial["decode_head.classifier.weight"])
    assert all(torch.isfinite(value).all() for value in trained.values() if value.is_floating_point())


def test_any_trainer_averages_accumulated_gradients(tiny_model_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    # HMS losses are means over pixels: a plain Trainer must divide them by the accumulation steps, not take them as
    # normalised by `num_items_in_batch` (what it assumes of a model whose forward takes **kwargs)
    trainer = Trainer(model=HMSForSemanticSegmentation.from_pretrained(tiny_model_dir),
                      args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    assert trainer.model_accepts_loss_kwargs is False


def _launch(launcher: list[str], script: str, report_dir: Path, argv: list[str]) -> None:
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    worker = str(Path(__file__).parent / "distributed_worker.py")
    result = subprocess.run([*launcher, worker, script, str(report_dir), *argv], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.parametrize("launcher, script, compiled", [
    ("torchrun", "trainer", False),
    ("accelerate", "accelerate", False),
    # --torch_compile under DDP (the multi-GPU recipe): Dynamo splits the graph at the gradient buckets
    ("accelerate", "accelerate", True),
], ids=["torchrun_trainer", "accelerate", "accelerate_compiled"])
def test_two_processes_all_reduce_gradients_and_read_disjoint_shards(tiny_model_dir, tmp_path, launcher, script,
                                                                      compiled):
    import sys

    # three evaluation images on two processes: one process has one more to evaluate
    data_dir, data_settings = tmp_path / "data", ("--synthetic_val_frames", "3")
    # the synthetic set must exist before two processes race to create it
    run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, data_dir, tmp_path / "warmup", "--max_steps", "1",
                                                     *data_settings)))
    report_dir = tmp_path / "reports"
    report_dir.mkdir()
    command = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"],
        # on a machine without GPUs, accelerate's multi-process launch runs MULTI_CPU (gloo)
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--main_process_port", "29532"],
    }[launcher]
    # three steps of one batch per rank: each step's batches must be disjoint, the updated parameters equal, and the
    # LR schedule where a single process would have it (one scheduler step per optimizer step, whatever the world size)
    argv = tiny_run_arguments(tiny_model_dir, data_dir, tmp_path / "run", "--do_train", "--do_eval", "--max_steps", "3",
                              "--per_device_train_batch_size", "2", "--class_uniform_fraction", "0", "--sync_bn",
                              "--save_strategy", "steps", "--save_steps", "3", *data_settings,
                              *(("--torch_compile_backend", "eager") if compiled else ()))
    _launch(command, script, report_dir, argv)
    reports = [json.loads((report_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["distributed"] and r["world_size"] == 2 for r in reports)
    assert all(r["sync_batch_norm"] == torch.cuda.is_available() for r in reports)  # SyncBatchNorm is CUDA-only
    assert reports[0]["parameters"] == reports[1]["parameters"], "ranks diverged: gradients were not all-reduced"
    # compiled: the model's forward in one graph on each rank (the breaks are the DDP wrapper's and this test's hook)
    assert all((r["compiled_graphs"] >= 1) == compiled for r in reports)
    first_batches = [set(r["indices"][:2]) for r in reports]
    assert all(len(batch) == 2 for batch in first_batches) and not first_batches[0] & first_batches[1]
    assert (tmp_path / "run" / "model.safetensors").exists()
    # one checkpoint, complete: model and optimizer from rank 0, the RNG state of each rank
    checkpoint = tmp_path / "run" / "checkpoint-3"
    rng_states = {"trainer": "rng_state_{}.pth", "accelerate": "random_states_{}.pkl"}[script]
    assert all((checkpoint / rng_states.format(rank)).is_file() for rank in (0, 1)), sorted(p.name for p in checkpoint.iterdir())
    assert sorted(p.name for p in (tmp_path / "run").glob("*checkpoint-*")) == ["checkpoint-3"]
    assert logged_learning_rates(tmp_path / "run", script) == pytest.approx([0.01 * (1 - step / 3) ** 2 for step in (0, 1, 2)])
    logged = [entry for entry in logged_history(tmp_path / "run", script) if "loss_main" in entry]
    assert [entry["loss_main"] for entry in logged] == pytest.approx(
        [(r0["main"] + r1["main"]) / 2 for r0, r1 in zip(reports[0]["loss_terms"], reports[1]["loss_terms"])], abs=1e-4
    ), "the logged loss terms must be means over both processes"
    evaluated = reports[0]["evaluated"] + reports[1]["evaluated"]
    if script == "accelerate":
        assert sorted(evaluated) == [0, 1, 2], "each evaluation image must be counted exactly once"
    else:  # the Trainer pads the last batch with a repeated image and drops it again in `gather_for_metrics`
        assert set(evaluated) == {0, 1, 2}
    results = json.loads((tmp_path / "run" / ("all_results.json" if script == "accelerate" else "eval_results.json")).read_text())
    assert 0 <= results["eval_mean_iou"] <= 1


def test_two_processes_train_on_a_stream(tiny_model_dir, synthetic_dir, tmp_path):
    import sys

    # a streamed split is read by rank 0 and dispatched batch by batch (accelerate's default for iterable datasets)
    run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, tmp_path / "warmup", "--max_steps", "1")))
    report_dir = tmp_path / "reports"
    report_dir.mkdir()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", "29533"]
    # --eval_visuals: process 0 pictures after each evaluation (the one after step 1 while process 1 trains on)
    argv = tiny_run_arguments(tiny_model_dir, synthetic_dir, tmp_path / "run", "--do_train", "--streaming",
                              "--max_steps", "2", "--class_uniform_fraction", "0", "--do_eval", "--eval_strategy",
                              "steps", "--eval_steps", "1", "--eval_visuals", "1")
    _launch(command, "accelerate", report_dir, argv)
    reports = [json.loads((report_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["distributed"] for r in reports) and reports[0]["parameters"] == reports[1]["parameters"]
    assert logged_learning_rates(tmp_path / "run", "accelerate") == pytest.approx([0.01, 0.01 * 0.5 ** 2])
    assert sorted(p.name for p in (tmp_path / "run" / "visuals").iterdir()) == ["step-2"]  # the latest evaluation's
    assert len(list((tmp_path / "run" / "visuals" / "step-2").iterdir())) == 9 + 1


def logged_history(output_dir: Path, script: str) -> list[dict]:
    """The training log, from the Trainer's `trainer_state.json` or the Accelerate script's `log_history.json`."""
    if script == "trainer":
        return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return json.loads((output_dir / "log_history.json").read_text())


def logged_learning_rates(output_dir: Path, script: str) -> list[float]:
    """The LR each logged step used."""
    return [entry["learning_rate"] for entry in logged_history(output_dir, script) if "learning_rate" in entry]


def test_sync_bn_converts_every_batch_norm_when_distributed_on_gpus(tiny_model_dir, monkeypatch):
    from hms_segmentation.training.arguments import ModelArguments
    from hms_segmentation.training.train import build_model

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = build_model(ModelArguments(model_name_or_path=str(tiny_model_dir), sync_bn=True), {i: str(i) for i in range(19)})
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    # a frozen trunk keeps its (converted) norms in eval mode, statistics fixed, while the rest trains
    model = build_model(ModelArguments(model_name_or_path=str(tiny_model_dir), sync_bn=True, freeze_trunk=True),
                        {i: str(i) for i in range(19)}).train()
    trunk_norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    head_norms = [m for m in model.decode_head.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert trunk_norms and all(isinstance(m, torch.nn.SyncBatchNorm) and not m.training for m in trunk_norms)
    assert head_norms and all(isinstance(m, torch.nn.SyncBatchNorm) and m.training for m in head_norms)
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_evaluate_cli_compares_scale_lists_and_writes_tables(tiny_model_dir, synthetic_dir, tmp_path, capsys):
    from hms_segmentation.cli import main as cli_main

    # make sure the tiny synthetic set exists (the evaluate CLI generates the default-sized one otherwise)
    run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, tmp_path / "warmup", "--max_steps", "1")))
    output = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tiny_model_dir), "--data-dir", str(synthetic_dir), "--scales", "1.0", "0.5,1.0",
            "--flip", "--output-dir", str(output)]
    assert cli_main(argv) == 0
    results = json.loads((output / "results.json").read_text())["results"]
    assert [r["scales"] for r in results] == [[1.0], [0.5, 1.0]] and all(r["flip"] for r in results)
    assert all(0 <= r["mean_iou"] <= 1 and r["images"] == 2 and r["seconds_per_image"] > 0 for r in results)
    table = (output / "results.md").read_text()
    assert "| road |" in table and "**mIoU**" in table and "0.5,1.0 +flip" in table
    assert cli_main(argv) == 2  # results are not overwritten
    assert "exists" in capsys.readouterr().err

    # the per-scale table with one column pair per model (e.g. RMI vs cross-entropy as the primary loss)
    compared = tmp_path / "compared"
    assert cli_main(["evaluate", "--model", f"rmi={tiny_model_dir}", "--model", f"ce={tiny_model_dir}", "--data-dir",
                     str(synthetic_dir), "--scales", "1.0", "0.5,1.0", "--output-dir", str(compared)]) == 0
    record = json.loads((compared / "results.json").read_text())
    assert set(record["results_by_model"]) == {"rmi", "ce"}
    comparison = (compared / "results.md").read_text()
    assert "| scales | rmi mIoU | rmi pixel acc. | ce mIoU | ce pixel acc. |" in comparison
    rmi, ce = record["results_by_model"]["rmi"], record["results_by_model"]["ce"]
    assert [r["mean_iou"] for r in rmi] == [r["mean_iou"] for r in ce]  # the same weights twice
    assert cli_main(["evaluate", "--model", f"a={tiny_model_dir}", "--model", f"a={tiny_model_dir}"]) == 2
    assert "given twice" in capsys.readouterr().err


def test_evaluate_runs_under_autocast_with_dataloader_workers(tiny_model_dir, synthetic_dir, tmp_path, capsys):
    from hms_segmentation.cli import main as cli_main
    from hms_segmentation.training.arguments import DataArguments
    from hms_segmentation.training.datasets import build_eval_dataset
    from hms_segmentation.training.evaluate import evaluate_scales

    run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, tmp_path / "warmup", "--max_steps", "1")))
    model = HMSForSemanticSegmentation.from_pretrained(tiny_model_dir).eval()
    dataset, id2label = build_eval_dataset(DataArguments(data_dir=str(synthetic_dir), synthetic_train_frames=4,
                                                         synthetic_val_frames=2, synthetic_height=64,
                                                         synthetic_width=128))
    dtypes = []
    model.backbone.register_forward_hook(lambda module, inputs, output: dtypes.append(
        (output[0] if isinstance(output, (tuple, list)) else output).dtype))
    plain = evaluate_scales(model, dataset, [0.5, 1.0], id2label=id2label)
    in_workers = evaluate_scales(model, dataset, [0.5, 1.0], id2label=id2label, num_workers=1)
    assert set(dtypes) == {torch.float32}
    bf16 = evaluate_scales(model, dataset, [0.5, 1.0], id2label=id2label, precision="bf16")
    assert set(dtypes[-4:]) == {torch.bfloat16}  # two scales, two images
    assert json.dumps({**in_workers, "seconds_per_image": 0}) == json.dumps({**plain, "seconds_per_image": 0})  # NaN
    assert (plain["precision"], bf16["precision"], plain["processes"]) == ("fp32", "bf16", 1)
    assert abs(bf16["mean_iou"] - plain["mean_iou"]) < 0.05  # a few pixels may change class, not many
    output = tmp_path / "eval"
    assert cli_main(["evaluate", "--model", str(tiny_model_dir), "--data-dir", str(synthetic_dir), "--scales", "1.0",
                     "--precision", "bf16", "--num-workers", "1", "--no-progress", "--output-dir", str(output)]) == 0
    assert "| class | 1.0 bf16 |" in (output / "results.md").read_text()
    assert json.loads((output / "results.json").read_text())["results"][0]["precision"] == "bf16"
    assert cli_main(["evaluate", "--model", str(tiny_model_dir), "--num-workers", "-1"]) == 2
    assert "--num-workers must be >= 0, got -1" in capsys.readouterr().err
    assert cli_main(["evaluate", "--model", str(tiny_model_dir), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    assert cli_main(["evaluate", "--model", str(tiny_model_dir), "--max-samples", "0"]) == 2
    assert "--max-samples must be at least 1 (or left out for every image), got 0" in capsys.readouterr().err


def test_evaluate_compiles_the_forward_and_keeps_the_compilation_out_of_the_time(tiny_model_dir, synthetic_dir,
                                                                                 tmp_path, capsys):
    from torch._dynamo.utils import counters

    from hms_segmentation.cli import main as cli_main

    run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, tmp_path / "warmup", "--max_steps", "1")))
    common = ["evaluate", "--model", str(tiny_model_dir), "--data-dir", str(synthetic_dir), "--scales", "1.0",
              "0.5,1.0", "--flip", "--no-progress"]
    assert cli_main([*common, "--output-dir", str(tmp_path / "plain")]) == 0
    torch._dynamo.reset()
    counters.clear()
    # Dynamo's eager backend: the captured graphs run as traced (seconds on a CPU, the same kernels as eager)
    assert cli_main([*common, "--torch-compile-backend", "eager", "--output-dir", str(tmp_path / "compiled")]) == 0
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]  # one graph per scale list
    plain, compiled = (json.loads((tmp_path / name / "results.json").read_text())["results"]
                       for name in ("plain", "compiled"))
    for before, after in zip(plain, compiled):
        assert after.pop("torch_compile") == {"backend": "eager", "mode": None}
        assert after.pop("warm_up_seconds") > 0
        assert json.dumps({**after, "seconds_per_image": 0}) == json.dumps({**before, "seconds_per_image": 0})
    assert "| first call s (compiles) |" in (tmp_path / "compiled" / "results.md").read_text()
    assert "first call s" not in (tmp_path / "plain" / "results.md").read_text()
    # bad names are reported before the dataset is made
    for flags, message in ((["--torch-compile-backend", "nope"], "--torch-compile-backend: Invalid backend: 'nope'"),
                           (["--torch-compile-mode", "fastest"], "--torch-compile-mode: Unrecognized mode=fastest")):
        assert cli_main(["evaluate", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "none"), *flags]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "none").exists()


def test_evaluate_with_inductor_matches_the_uncompiled_model(tiny_model_dir, synthetic_dir, tmp_path):
    """The real compiler (inductor: generated C++ kernels on a CPU) at one scale: its fused kernels round differently,
    so the figures agree closely rather than bit for bit."""
    from hms_segmentation.cli import main as cli_main

    run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, tmp_path / "warmup", "--max_steps", "1")))
    common = ["evaluate", "--model", str(tiny_model_dir), "--data-dir", str(synthetic_dir), "--scales", "1.0",
              "--no-progress"]
    assert cli_main([*common, "--output-dir", str(tmp_path / "plain")]) == 0
    torch._dynamo.reset()
    assert cli_main([*common, "--torch-compile", "--output-dir", str(tmp_path / "compiled")]) == 0
    (plain,), (compiled,) = (json.loads((tmp_path / name / "results.json").read_text())["results"]
                             for name in ("plain", "compiled"))
    assert compiled["torch_compile"] == {"backend": "inductor", "mode": None}
    assert abs(compiled["mean_iou"] - plain["mean_iou"]) < 0.01


def test_evaluate_in_batches_gives_the_figures_and_predictions_of_single_images(tiny_deeplab_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from hms_segmentation.training.evaluate import evaluate_scales, main as evaluate_main

    # three frames in batches of two: one full batch and one of a single image
    data_dir = tmp_path / "data"
    run_training(*parse_arguments(tiny_run_arguments(tiny_deeplab_dir, data_dir, tmp_path / "warmup", "--max_steps", "1",
                                                     "--synthetic_val_frames", "3", "--per_device_train_batch_size", "2")))
    common = ["--model", str(tiny_deeplab_dir), "--data-dir", str(data_dir), "--scales", "0.5,1.0", "--flip",
              "--no-progress", "--prediction-format", "train_ids"]
    for batch_size in ("1", "2"):
        assert evaluate_main([*common, "--batch-size", batch_size, "--output-dir", str(tmp_path / f"results_{batch_size}"),
                              "--save-predictions", str(tmp_path / f"predictions_{batch_size}")]) == 0
    one, two = (json.loads((tmp_path / f"results_{b}" / "results.json").read_text())["results"][0] for b in "12")
    assert one["images"] == two["images"] == 3 and len(set(one["per_category_iou"].values()) - {None}) > 1
    for key in ("mean_iou", "overall_accuracy", "per_category_iou"):
        assert one[key] == pytest.approx(two[key], abs=1e-6), key
    singles, batched = (sorted((tmp_path / f"predictions_{b}").iterdir()) for b in "12")
    assert [p.name for p in singles] == [p.name for p in batched] and len(singles) == 3
    for single, in_batch in zip(singles, batched):
        assert (np.array(Image.open(single)) != np.array(Image.open(in_batch))).mean() < 1e-3
    # images of different sizes (Mapillary at full size) cannot share a batch: the message names the flag
    model = HMSForSemanticSegmentation.from_pretrained(tiny_deeplab_dir).eval()
    samples = [{"pixel_values": torch.zeros(3, *size), "labels": torch.zeros(size, dtype=torch.long)}
               for size in ((64, 128), (96, 128))]
    with pytest.raises(ValueError, match=r"different sizes \(64x128, 96x128\).*need --batch-size 1"):
        evaluate_scales(model, samples, [1.0], batch_size=2)


def test_evaluate_on_two_processes_gives_the_figures_of_one(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    data_dir = tmp_path / "data"  # three val frames: one process evaluates two, the other one
    run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, data_dir, tmp_path / "warmup", "--max_steps", "1",
                                                     "--synthetic_val_frames", "3")))
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--scales", "0.5,1.0", "--flip",
            "--no-progress", "--scale-shares"]
    from hms_segmentation.training.evaluate import main as evaluate_main

    assert evaluate_main([*argv, "--output-dir", str(tmp_path / "one"), "--save-predictions",
                          str(tmp_path / "one_predictions"), "--save-visuals", str(tmp_path / "one_visuals"),
                          "--num-visuals", "2", "--visuals-select", "worst"]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "hms_segmentation.training.evaluate", *argv, "--output-dir", str(tmp_path / "two"),
               "--save-predictions", str(tmp_path / "two_predictions"), "--save-visuals", str(tmp_path / "two_visuals"),
               "--num-visuals", "2", "--visuals-select", "worst"]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    one, two = (json.loads((tmp_path / name / "results.json").read_text())["results"] for name in ("one", "two"))
    assert [r["processes"] for r in one + two] == [1, 2] and all(r["images"] == 3 for r in one + two)
    for single, double in zip(one, two):  # the summed confusion matrices: the same figures exactly
        assert {k: v for k, v in double.items() if k not in ("seconds_per_image", "processes", "scale_shares")} == {
            k: v for k, v in single.items() if k not in ("seconds_per_image", "processes", "scale_shares")}
        # the scale shares: float sums, in another order
        assert double["scale_shares"]["all"] == pytest.approx(single["scale_shares"]["all"], rel=1e-9)
        assert double["scale_shares"]["per_category"]["road"] == pytest.approx(
            single["scale_shares"]["per_category"]["road"], rel=1e-9)
    assert result.stdout.count("**mIoU**") == 1  # one process prints the table
    # each process wrote the predictions of its images: all of them, as one process does
    one, two = ({p.name: p.read_bytes() for p in (tmp_path / name).iterdir()} for name in ("one_predictions", "two_predictions"))
    assert len(one) == 3 and one == two
    # and the pictures of the two worst images, chosen from the error counts of both processes, the index page too
    one, two = ({p.name: p.read_bytes() for p in (tmp_path / name).iterdir()} for name in ("one_visuals", "two_visuals"))
    assert len(one) == 2 * 9 + 1 and one == two


def test_evaluate_saves_predictions_for_the_cityscapes_benchmark(tiny_deeplab_dir, shared_data_dir, tmp_path, capsys):
    """--save-predictions: labelIds named by the frame (what cityscapesScripts' evaluator and the benchmark server
    read, matched by <city>_<sequence>_<frame>*.png), the same predictions as the scored ones."""
    import numpy as np
    from PIL import Image

    from hms_segmentation.data import load_cityscapes
    from hms_segmentation.evaluation import mean_iou, preprocess_logits_for_metrics
    from hms_segmentation.label_tables import CITYSCAPES_PALETTE, CITYSCAPES_TRAIN_LABELS, cityscapes_label_id_to_train_id
    from hms_segmentation.training.arguments import DataArguments
    from hms_segmentation.training.datasets import build_eval_dataset
    from hms_segmentation.training.evaluate import main as evaluate_main, predict

    root = shared_data_dir / "cityscapes_sample"
    model = HMSForSemanticSegmentation.from_pretrained(tiny_deeplab_dir).eval()  # its predictions vary over a frame
    common = ["--model", str(tiny_deeplab_dir), "--dataset", "cityscapes", "--data-dir", str(root), "--scales", "0.5,1.0",
              "--no-progress"]
    for name in ("label_ids", "train_ids", "color"):
        assert evaluate_main([*common, "--save-predictions", str(tmp_path / name), "--prediction-format", name,
                              "--output-dir", str(tmp_path / f"results_{name}")]) == 0
    frame = "frankfurt_000000_000294.png"
    assert [p.name for p in (tmp_path / "label_ids").iterdir()] == [frame]  # no partial file left behind
    label_ids = np.array(Image.open(tmp_path / "label_ids" / frame))
    train_ids = np.array(Image.open(tmp_path / "train_ids" / frame))
    coloured = Image.open(tmp_path / "color" / frame)
    assert set(np.unique(label_ids)) <= {label.id for label in CITYSCAPES_TRAIN_LABELS}
    to_train_id = np.full(256, 255, np.uint8)
    for label_id, train_id in cityscapes_label_id_to_train_id().items():
        to_train_id[label_id] = train_id
    np.testing.assert_array_equal(to_train_id[label_ids], train_ids)
    assert coloured.mode == "P" and coloured.getpalette()[:6] == [*CITYSCAPES_PALETTE[0], *CITYSCAPES_PALETTE[1]]
    np.testing.assert_array_equal(np.array(coloured), train_ids)
    # the saved predictions are the scored ones, pixel for pixel, at the labels' size
    dataset, _ = build_eval_dataset(DataArguments(dataset="cityscapes", data_dir=str(root)))
    sample = dataset[0]
    with torch.inference_mode():
        scored = preprocess_logits_for_metrics(predict(model, sample["pixel_values"][None], [0.5, 1.0], flip=False),
                                               sample["labels"][None], model.config.align_corners)[0]
    np.testing.assert_array_equal(train_ids, scored.numpy())
    assert len(np.unique(train_ids)) > 1
    ground_truth = np.array(load_cityscapes(root, "val")[0]["label"])
    result = json.loads((tmp_path / "results_label_ids" / "results.json").read_text())["results"][0]
    assert mean_iou([train_ids], [ground_truth], num_labels=19)["mean_iou"] == pytest.approx(result["mean_iou"], abs=1e-12)
    # a prediction already there is the user's until --overwrite
    before = (tmp_path / "label_ids" / frame).read_bytes()
    (tmp_path / "label_ids" / frame).write_bytes(b"mine")
    assert evaluate_main([*common, "--save-predictions", str(tmp_path / "label_ids")]) == 2
    assert "frankfurt_000000_000294.png exists (1 of the 1 predictions do)" in capsys.readouterr().err
    assert (tmp_path / "label_ids" / frame).read_bytes() == b"mine"
    assert evaluate_main([*common, "--save-predictions", str(tmp_path / "label_ids"), "--overwrite"]) == 0
    assert (tmp_path / "label_ids" / frame).read_bytes() == before
    assert evaluate_main([*common, "--scales", "1.0", "0.5,1.0", "--save-predictions", str(tmp_path / "two")]) == 2
    assert "give one --model and one --scales list, got 1 model(s) and 2 scale list(s)" in capsys.readouterr().err


def test_evaluate_refuses_two_images_saved_under_one_name(tiny_model_dir, synthetic_dir, tmp_path, capsys, monkeypatch):
    from hms_segmentation.training.datasets import SegmentationEvalDataset
    from hms_segmentation.training.evaluate import main as evaluate_main

    run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, tmp_path / "warmup", "--max_steps", "1")))
    # e.g. a Hub dataset whose id column holds "a/b" and "a_b": both would be a_b.png
    monkeypatch.setattr(SegmentationEvalDataset, "sample_ids", lambda self: ["city/frame", "city_frame"])
    assert evaluate_main(["--model", str(tiny_model_dir), "--data-dir", str(synthetic_dir), "--scales", "1.0",
                          "--save-predictions", str(tmp_path / "predictions")]) == 2
    assert "two images of the split would both be saved as" in capsys.readouterr().err
    assert not (tmp_path / "predictions").exists()


def test_evaluate_saves_pictures_of_the_prediction_and_each_scales_attention(tiny_deeplab_dir, synthetic_dir, tmp_path,
                                                                             capsys):
    """--save-visuals (the reference's --dump_assets): input, ground truth, the scored prediction, the composite, each
    scale's own prediction and the attention maps the chain reads, at the labels' size, with an index page."""
    import numpy as np
    from PIL import Image
    from torch.nn import functional as F

    from hms_segmentation.label_tables import CITYSCAPES_PALETTE
    from hms_segmentation.training.arguments import DataArguments
    from hms_segmentation.training.datasets import build_eval_dataset
    from hms_segmentation.training.evaluate import main as evaluate_main, save_evaluation_visuals

    ensure_tiny_synthetic(synthetic_dir)
    dataset, _ = build_eval_dataset(DataArguments(data_dir=str(synthetic_dir)))
    sample_id, sample = dataset.sample_ids()[0], dataset[0]
    model = HMSForSemanticSegmentation.from_pretrained(tiny_deeplab_dir).eval()
    with torch.no_grad():  # a fresh head's attention is 0.5 to three decimals: make it vary over the picture
        model.scale_attention_head.projection.weight.mul_(1000)
    model.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--data-dir", str(synthetic_dir), "--scales", "0.5,1.0", "--no-progress"]
    visuals = tmp_path / "visuals"
    assert evaluate_main([*common, "--flip", "--save-visuals", str(visuals), "--num-visuals", "1",
                          "--save-predictions", str(tmp_path / "predictions"), "--prediction-format", "color"]) == 0
    kinds = ("input", "gt", "prediction", "composited", "pred_0.5x", "pred_1.0x", "attn_0.5x",  # 1.0x's: never read
             "weight_0.5x", "weight_1.0x")
    assert sorted(p.name for p in visuals.iterdir()) == sorted([f"{sample_id}_{kind}.png" for kind in kinds] + ["index.html"])
    picture = {kind: np.array(Image.open(visuals / f"{sample_id}_{kind}.png")) for kind in kinds}
    height, width = sample["labels"].shape
    assert all(array.shape[:2] == (height, width) for array in picture.values())
    original = np.array(Image.open(next(synthetic_dir.glob(f"leftImg8bit/val/*/{sample_id}_leftImg8bit.png"))))
    assert np.abs(picture["input"].astype(int) - original).max() <= 1  # normalised and back
    colours = np.zeros((256, 3), np.uint8)
    colours[:19] = CITYSCAPES_PALETTE
    np.testing.assert_array_equal(picture["gt"], colours[sample["labels"].numpy().astype(np.uint8)])
    # the scored (flipped) prediction, as --save-predictions writes it
    scored = np.array(Image.open(tmp_path / "predictions" / f"{sample_id}.png").convert("RGB"))
    np.testing.assert_array_equal(picture["prediction"], scored)
    blended = Image.blend(Image.fromarray(picture["input"]), Image.fromarray(scored), 0.4)
    np.testing.assert_array_equal(picture["composited"], np.array(blended))
    with torch.inference_mode():
        outputs = model(sample["pixel_values"][None], scales=[0.5, 1.0], output_attentions=True)
    attention = F.interpolate(outputs.attentions[0], size=(height, width), mode="bilinear", align_corners=False)
    assert np.abs(picture["attn_0.5x"].astype(int) - (attention[0, 0] * 255).round().numpy()).max() <= 1
    assert picture["attn_0.5x"].std() > 10
    # two scales: 0.5 decides where its attention is high, 1.0 the rest
    assert np.abs(picture["weight_0.5x"].astype(int) - picture["attn_0.5x"]).max() <= 1
    assert np.abs(picture["weight_1.0x"].astype(int) + picture["attn_0.5x"] - 255).max() <= 1
    one_scale = F.interpolate(outputs.scale_logits[1], size=(height, width), mode="bilinear").argmax(1)[0]
    np.testing.assert_array_equal(picture["pred_1.0x"], colours[one_scale.numpy()])
    page = (visuals / "index.html").read_text()
    assert sample_id in page and all(f'src="{sample_id}_{kind}.png"' in page for kind in kinds)
    assert "0.5,1.0 +flip" in page
    # the pictures already there are the user's until --overwrite
    (visuals / f"{sample_id}_input.png").write_bytes(b"mine")
    assert evaluate_main([*common, "--save-visuals", str(visuals), "--num-visuals", "1"]) == 2
    assert f"{sample_id}_input.png exists (10 of the 10 pictures do)" in capsys.readouterr().err
    assert (visuals / f"{sample_id}_input.png").read_bytes() == b"mine"
    assert evaluate_main([*common, "--save-visuals", str(visuals), "--num-visuals", "1", "--overwrite"]) == 0
    assert (visuals / f"{sample_id}_input.png").read_bytes() != b"mine"
    # 0: every image of the split
    assert evaluate_main([*common, "--save-visuals", str(tmp_path / "all"), "--num-visuals", "0"]) == 0
    assert len(list((tmp_path / "all").glob("*_composited.png"))) == len(dataset) == 2
    # the worst predicted image: the one with the largest share of wrong labelled pixels, said on the page
    assert evaluate_main([*common, "--save-visuals", str(tmp_path / "worst"), "--num-visuals", "1", "--visuals-select",
                          "worst", "--save-predictions", str(tmp_path / "train_ids"), "--prediction-format",
                          "train_ids"]) == 0
    rates = {}
    for index, image_id in enumerate(dataset.sample_ids()):
        labels = dataset[index]["labels"].numpy()
        predicted = np.array(Image.open(tmp_path / "train_ids" / f"{image_id}.png"))
        rates[image_id] = ((predicted != labels) & (labels != 255)).sum() / (labels != 255).sum()
    worst = max(rates, key=rates.get)
    assert len(set(rates.values())) == 2 and {p.name for p in (tmp_path / "worst").glob("*_input.png")} == {
        f"{worst}_input.png"}
    assert f"{worst}<br>{100 * rates[worst]:.1f}% of pixels wrong" in (tmp_path / "worst" / "index.html").read_text()
    # which images the worst are is known only after the evaluation: a picture of any image stops it
    assert evaluate_main([*common, "--save-visuals", str(visuals), "--visuals-select", "worst"]) == 2
    assert "exists (10 of the 19 pictures do)" in capsys.readouterr().err  # 9 for each image, and the index
    # what --eval_visuals calls in training: the model pictured in eval mode, then back in training mode
    model.train()
    index = save_evaluation_visuals(model, dataset, tmp_path / "in_training", 1, CITYSCAPES_PALETTE, "step 7")
    assert model.training and "step 7" in index.read_text()
    kinds = (*kinds, "pred_2.0x", "attn_1.0x", "weight_2.0x")  # at the model's inference scales, 0.5,1.0,2.0
    assert sorted(p.name for p in (tmp_path / "in_training").iterdir()) == sorted(
        [f"{sample_id}_{kind}.png" for kind in kinds] + ["index.html"])
    assert evaluate_main([*common, "--save-visuals", str(tmp_path / "bad"), "--num-visuals", "-1"]) == 2
    assert "--num-visuals must be >= 0 (0: every image), got -1" in capsys.readouterr().err
    assert evaluate_main([*common, "--scales", "1.0", "0.5,1.0", "--save-visuals", str(tmp_path / "bad")]) == 2
    assert "--save-visuals saves one prediction per image: give one --model and one --scales list" in (
        capsys.readouterr().err)
    assert evaluate_main([*common[:-3], "--no-progress", "--save-visuals", str(tmp_path / "bad")]) == 2
    assert "got 1 model(s) and 2 scale list(s) (two without --scales: 1.0 and 0.5,1.0,2.0)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_scale_shares_are_the_mean_weight_of_each_scale_over_each_class(tiny_model_dir, synthetic_dir, tmp_path,
                                                                          capsys):
    from hms_segmentation.training.evaluate import main as evaluate_main, scale_share_sums

    # a uniform attention of 0.25 at scale 0.5 gives it a quarter of every pixel, the rest to 1.0; ignored pixels and
    # the highest scale's attention do not count
    labels = torch.tensor([[[0, 1, 255], [1, 1, 2]]])
    sums = scale_share_sums((torch.full((1, 1, 1, 2), 0.25), torch.rand(1, 1, 2, 3)), labels, num_labels=4,
                            ignore_index=255)
    torch.testing.assert_close(sums, torch.tensor([[0.25, 0.75, 0.25, 0], [0.75, 2.25, 0.75, 0], [1, 3, 1, 0]],
                                                  dtype=torch.float64))
    ensure_tiny_synthetic(synthetic_dir)
    output = tmp_path / "eval"
    assert evaluate_main(["--model", str(tiny_model_dir), "--data-dir", str(synthetic_dir), "--scales", "1.0",
                          "0.5,1.0,2.0", "--scale-shares", "--no-progress", "--output-dir", str(output)]) == 0
    single, chain = json.loads((output / "results.json").read_text())["results"]
    assert "scale_shares" not in single  # one scale decides everything: nothing to report
    shares = chain["scale_shares"]
    assert list(shares["all"]) == ["0.5", "1.0", "2.0"] and sum(shares["all"].values()) == pytest.approx(1)
    present = {name: per_scale for name, per_scale in shares["per_category"].items() if per_scale is not None}
    assert present and all(sum(per_scale.values()) == pytest.approx(1) for per_scale in present.values())
    assert shares["per_category"].keys() == chain["per_category_iou"].keys()
    table = (output / "results.md").read_text()
    assert "Share of each scale in the result (0.5,1.0,2.0)" in table and "| **all pixels** |" in table
    # a split without labelled pixels (the test split's placeholders): n/a, not a division by zero
    from hms_segmentation.training.evaluate import scale_share_table

    from hms_segmentation.training.evaluate import evaluate_scales

    model = HMSForSemanticSegmentation.from_pretrained(tiny_model_dir).eval()
    unlabelled = [{"pixel_values": torch.zeros(3, 64, 128), "labels": torch.full((64, 128), 255)}]
    empty = evaluate_scales(model, unlabelled, [0.5, 1.0, 2.0], scale_shares=True)
    assert empty["scale_shares"]["all"] == {"0.5": None, "1.0": None, "2.0": None}
    assert set(empty["scale_shares"]["per_category"].values()) == {None}
    assert "| **all pixels** | n/a | n/a | n/a |" in scale_share_table([empty])
    # the baselines fuse without the chain: refused, naming the setting
    config_path = tmp_path / "average" / "config.json"
    model = HMSForSemanticSegmentation.from_pretrained(tiny_model_dir)
    model.config.scale_fusion = "average"
    model.save_pretrained(config_path.parent)
    assert evaluate_main(["--model", str(config_path.parent), "--data-dir", str(synthetic_dir), "--scales", "0.5,1.0",
                          "--scale-shares"]) == 2
    assert "--scale-shares reads HMSA's attention chain" in capsys.readouterr().err


def test_visuals_pick_images_evenly_and_only_the_attention_maps_the_fusion_reads():
    from hms_segmentation.training.visuals import VisualsWriter, attention_scales, visualized_indices, worst_indices

    assert visualized_indices(10, 3) == [0, 3, 6] and visualized_indices(500, 10)[-1] == 450  # the reference's spacing
    assert visualized_indices(3, 0) == [0, 1, 2]  # every image
    assert visualized_indices(2, 5) == [0, 1]
    with pytest.raises(ValueError, match="--num-visuals must be >= 0"):
        worst_indices([0.5], -1)
    # a single scale: no attention read, no share to show
    assert VisualsWriter(Path("unused"), (), [1.0], "hierarchical").file_names("a") == {
        "input": "a_input.png", "ground truth": "a_gt.png", "prediction": "a_prediction.png",
        "composited": "a_composited.png", "prediction 1.0x": "a_pred_1.0x.png"}
    with pytest.raises(ValueError, match="--num-visuals must be >= 0"):
        visualized_indices(3, -2)
    nan = float("nan")
    assert worst_indices([0.1, nan, 0.5, 0.2, 0.5], 2) == [2, 4] and worst_indices([0.1, nan, 0.5], 0) == [2, 0, 1]
    assert attention_scales([1.0, 0.5, 2.0], "hierarchical") == [0.5, 1.0]  # the highest scale starts the chain
    assert attention_scales([1.0, 0.5], "explicit") == [0.5, 1.0] and attention_scales([0.5, 1.0], "max") == []


def test_mapillary_training_ids_map_back_to_its_label_ids():
    from hms_segmentation.data.mapillary import mapillary_label_set

    label_set = mapillary_label_set(None, "v1.2")
    to_label_id = label_set.train_id_to_label_id()
    forward = label_set.label_mapping()
    assert len(to_label_id) == len(label_set.id2label) == 65
    assert all(forward.train_ids[label_id] == train_id for train_id, label_id in to_label_id.items())


def test_evaluation_timing_waits_for_the_gpu(monkeypatch):
    from hms_segmentation.training.evaluate import wait_for_device

    waited = []
    monkeypatch.setattr(torch.accelerator, "synchronize", waited.append)
    wait_for_device(torch.device("cpu"))
    assert waited == []
    wait_for_device(torch.device("cuda", 1))
    assert waited == [torch.device("cuda", 1)]


def test_a_batch_of_images_of_different_sizes_names_the_argument_to_change():
    from hms_segmentation.training.train import collate_samples

    def sample(height: int, width: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.zeros(3, height, width), "labels": torch.zeros(height, width, dtype=torch.long)}

    batch = collate_samples([sample(4, 6), sample(4, 6)])
    assert batch["pixel_values"].shape == (2, 3, 4, 6) and batch["labels"].shape == (2, 4, 6)
    with pytest.raises(ValueError, match=r"different sizes \(4x6, 5x6\).*--per_device_eval_batch_size 1"):
        collate_samples([sample(5, 6), sample(4, 6)])


def test_accelerate_evaluation_refuses_batches_of_images_of_different_sizes(tiny_model_dir):
    from accelerate import Accelerator

    from hms_segmentation.training.train_accelerate import evaluate

    samples = [{"pixel_values": torch.zeros(3, size, 32), "labels": torch.zeros(size, 32, dtype=torch.long)} for size in (32, 48)]
    model = HMSForSemanticSegmentation.from_pretrained(tiny_model_dir)
    id2label = {i: str(i) for i in range(19)}
    with pytest.raises(ValueError, match=r"different sizes \(32x32, 48x32\).*--per_device_eval_batch_size 1"):
        evaluate(model, samples, Accelerator(cpu=True), id2label, batch_size=2)
    assert 0 <= evaluate(model, samples, Accelerator(cpu=True), id2label, batch_size=1)["eval_mean_iou"] <= 1


def test_flip_averages_with_the_mirrored_prediction(tiny_model_dir):
    from hms_segmentation.training.evaluate import predict

    model = HMSForSemanticSegmentation.from_pretrained(tiny_model_dir).eval()
    pixel_values = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        plain = model(pixel_values, scales=[1.0]).logits
        mirrored = model(pixel_values.flip(-1), scales=[1.0]).logits.flip(-1)
        torch.testing.assert_close(predict(model, pixel_values, [1.0], flip=True), (plain + mirrored) / 2)


class _Killed(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


def _final_parameters(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in HMSForSemanticSegmentation.from_pretrained(folder).state_dict().items() if v.is_floating_point()}


def _train_until_killed(script: str, arguments, kill_after_first_save: bool) -> None:
    """Run `script` (trainer / accelerate); with `kill_after_first_save`, die as a killed run would, just after the
    first checkpoint is complete."""
    from transformers import TrainerCallback

    from hms_segmentation.training import train_accelerate

    if script == "trainer":
        class KillAfterSave(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                raise _Killed

        run_training(*arguments, callbacks=[KillAfterSave()] if kill_after_first_save else None)
        return
    original = train_accelerate.save_checkpoint

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise _Killed

    if kill_after_first_save:
        train_accelerate.save_checkpoint = save_then_die
    try:
        train_accelerate.run_training(*arguments)
    finally:
        train_accelerate.save_checkpoint = original


@pytest.mark.parametrize("script", ["trainer", "accelerate", "accelerate_legacy_checkpoint", "trainer_stream",
                                    "accelerate_stream"])
def test_a_killed_run_resumes_from_its_last_checkpoint_as_if_never_stopped(tiny_model_dir, synthetic_dir, tmp_path, script):
    extra = ("--do_train", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--primary_loss",
             "cross_entropy", "--class_uniform_fraction", "0")
    if script.endswith("_stream"):
        # 4 frames in batches of 2: killed after step 3, in the stream's second epoch, which step 4 must finish
        script = script.removesuffix("_stream")
        extra = (*extra, "--streaming", "--save_steps", "3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    def run(output_dir: Path, kill_after_first_save: bool) -> None:
        arguments = parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, output_dir, *extra))
        _train_until_killed("trainer" if script == "trainer" else "accelerate", arguments, kill_after_first_save)

    run(straight, kill_after_first_save=False)
    with pytest.raises(_Killed):
        run(resumed, kill_after_first_save=True)
    assert not (resumed / "model.safetensors").exists()
    if script == "accelerate_legacy_checkpoint":  # as written when the scheduler went through accelerator.prepare
        (resumed / "checkpoint-2" / "custom_checkpoint_0.pkl").rename(resumed / "checkpoint-2" / "scheduler.bin")
    run(resumed, kill_after_first_save=False)  # same command again: picks up checkpoint-2
    expected, got = _final_parameters(straight), _final_parameters(resumed)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}")


def test_ignore_data_skip_restarts_the_resumed_epoch_in_both_scripts(tiny_model_dir, synthetic_dir, tmp_path):
    """Killed mid-epoch (after step 1 of 2 per epoch) and resumed with --ignore_data_skip: the epoch starts over from
    its first batch in both scripts, so both end on the same weights, unlike a resume that skips the trained batch."""
    extra = ("--do_train", "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--primary_loss",
             "cross_entropy", "--class_uniform_fraction", "0", "--train_sampling_strategy", "sequential")
    final = {}
    for script, ignore in (("trainer", "true"), ("accelerate", "true"), ("accelerate", "false")):
        output = tmp_path / f"{script}_{ignore}"
        arguments = tiny_run_arguments(tiny_model_dir, synthetic_dir, output, *extra)
        with pytest.raises(_Killed):
            _train_until_killed(script, parse_arguments(arguments), kill_after_first_save=True)
        _train_until_killed(script, parse_arguments([*arguments, "--ignore_data_skip", ignore]), False)
        final[script, ignore] = _final_parameters(output)
    for key, value in final["trainer", "true"].items():
        torch.testing.assert_close(final["accelerate", "true"][key], value, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")
    key = "decode_head.classifier.weight"
    assert not torch.allclose(final["accelerate", "false"][key], final["accelerate", "true"][key])


def test_half_written_checkpoints_are_never_resumed(tmp_path):
    from hms_segmentation.training.train import last_complete_checkpoint

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()  # the run died while writing this one
    (tmp_path / "checkpoint-4" / "model.safetensors").write_text("partial")
    (tmp_path / "checkpoint-6").mkdir()  # ... or while writing its last file
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6, "log_hist')
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def test_quickstart_runs_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    from hms_segmentation.cli import main as cli_main

    output = tmp_path / "quickstart"
    argv = ["quickstart", "--output-dir", str(output), "--max-steps", "2", "--batch-size", "2", "--crop-size", "64",
            "--train-frames", "4", "--val-frames", "2", "--frame-height", "64", "--frame-width", "128"]
    assert cli_main(argv) == 0
    report = json.loads((output / "report.json").read_text())
    assert 0 <= report["single_scale_mean_iou"] <= 1 and 0 <= report["multi_scale_mean_iou"] <= 1
    assert (output / "model" / "model.safetensors").exists() and (output / "predictions.png").exists()
    from PIL import Image

    # 7 panels of 128x64, two per row: image, ground truth, the two predictions, and the shares of 0.5, 1.0 and 2.0
    assert Image.open(output / "predictions.png").size == (2 * 128, 4 * 64)
    assert HMSForSemanticSegmentation.from_pretrained(output / "model").config.inference_scales == [0.5, 1.0, 2.0]
    out = capsys.readouterr().out
    assert "mIoU single-scale" in out and str(output / "model") in out
    assert cli_main(argv) == 2  # an earlier run's results are kept


@pytest.mark.parametrize("name", ["report.json", "evaluation.json", "predictions.png"])
def test_quickstart_never_replaces_a_file_of_the_user_it_would_write(tmp_path, capsys, name):
    from hms_segmentation.cli import main as cli_main

    output = tmp_path / "mine"
    output.mkdir()
    (output / name).write_text("the user's own")
    assert cli_main(["quickstart", "--output-dir", str(output), "--max-steps", "1"]) == 2
    assert (output / name).read_text() == "the user's own" and sorted(p.name for p in output.iterdir()) == [name]
    assert f"already holds {name}" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--hue-jitter", "0.7", r"the hue jitter must be in \[0, 0.5\] turns, got 0.7"),
    ("--crop-size", "0", "--crop_size must be a positive number of pixels, got 0"),
    # each epoch drops its incomplete last batch: it would train no step and report the untrained model
    ("--train-frames", "2", r"--train-frames 2 is fewer than one batch \(--batch-size 4\): the run would train no"),
])
def test_quickstart_names_a_bad_value_without_a_traceback(tmp_path, capsys, flag, value, message):
    from hms_segmentation.cli import main as cli_main

    assert cli_main(["quickstart", "--output-dir", str(tmp_path / "qs"), flag, value]) == 2
    assert re.search(f"^error: {message}", capsys.readouterr().err, flags=re.MULTILINE)
    assert not (tmp_path / "qs").exists()  # nothing generated


def test_fine_tuning_a_converted_model_to_five_classes_changes_heads_not_frozen_trunk(synthetic_dir, tmp_path):
    from hms_segmentation.convert_nvidia import convert_nvidia_checkpoint
    from hms_segmentation.training.arguments import ModelArguments
    from hms_segmentation.training.datasets import SegmentationEvalDataset
    from hms_segmentation.training.train import build_model
    from hms_segmentation.data import load_cityscapes
    from test_convert_nvidia import _nvidia_name

    # a tiny 19-class model saved the way NVIDIA's training code saves checkpoints, then converted
    torch.manual_seed(0)
    source = HMSForSemanticSegmentation(HMSConfig(**{**TINY_HRNET, "num_labels": 19}, ocr_dropout=0.0))
    checkpoint = tmp_path / "nvidia.pth"
    torch.save({"state_dict": {"module." + _nvidia_name(k): v for k, v in source.state_dict().items()}}, checkpoint)
    convert_nvidia_checkpoint(checkpoint, tmp_path / "converted", dataset="cityscapes")

    five_classes = {i: f"group_{i}" for i in range(5)}
    model = build_model(ModelArguments(model_name_or_path=str(tmp_path / "converted"), ignore_mismatched_sizes=True,
                                       freeze_trunk=True, primary_loss="cross_entropy"), five_classes)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    class FiveClassSynthetic(torch.utils.data.Dataset):
        """The synthetic frames with their 19 classes folded into 5 (ignore stays ignore)."""

        def __init__(self):
            self.frames = SegmentationEvalDataset(load_cityscapes(ensure_tiny_synthetic(synthetic_dir), "train"))

        def __len__(self):
            return len(self.frames)

        def __getitem__(self, index):
            sample = self.frames[index]
            labels = sample["labels"]
            return {"pixel_values": sample["pixel_values"], "labels": torch.where(labels == 255, labels, labels % 5)}

    _, _, training_args = parse_arguments(["--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--report_to",
                                           "none", "--use_cpu", "true", "--per_device_train_batch_size", "2"])
    HMSTrainer(model=model, args=training_args, train_dataset=FiveClassSynthetic()).train()
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert {"decode_head.classifier.weight", "decode_head.soft_region_head.1.weight"} <= changed
    assert not any(k.startswith("backbone.") and not k.endswith(("running_mean", "running_var")) for k in changed)
    assert model.config.id2label[4] == "group_4" and after["decode_head.classifier.weight"].shape[0] == 5


def test_trainer_step_normalises_uint8_samples_like_float32_samples(tiny_model_dir, tmp_path):
    from hms_segmentation.data.transforms import normalize_pixel_values
    from hms_segmentation.training.train import normalize_uint8_pixel_values

    model = HMSForSemanticSegmentation.from_pretrained(tiny_model_dir)
    _, _, training_args = parse_arguments(["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "true"])
    trainer = HMSTrainer(model=model, args=training_args)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 19, (2, 64, 64), dtype=torch.uint8, generator=generator)
    labels[:, :8] = 255
    as_float = {"pixel_values": normalize_pixel_values(pixels), "labels": labels.long()}
    assert normalize_uint8_pixel_values(as_float) is as_float  # float batches (evaluation) pass through untouched
    model.train()
    loss_uint8 = trainer.compute_loss(model, {"pixel_values": pixels, "labels": labels})
    loss_float = trainer.compute_loss(model, as_float)
    assert torch.isfinite(loss_uint8) and loss_uint8.item() == loss_float.item()
    loss_uint8.backward()
    assert model.decode_head.classifier.weight.grad.abs().sum() > 0


def test_uint8_training_samples_train_like_float32_samples(tiny_model_dir, synthetic_dir, tmp_path):
    """The default --train_sample_dtype uint8 (normalised in compute_loss) trains as float32 samples do."""
    extra = ("--do_train", "--primary_loss", "cross_entropy", "--seed", "3")
    histories, weights = {}, {}
    for dtype in ("float32", "uint8"):
        output_dir = tmp_path / dtype
        run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, output_dir, *extra,
                                                         "--train_sample_dtype", dtype)))
        state = json.loads((output_dir / "trainer_state.json").read_text())
        histories[dtype] = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
        weights[dtype] = _final_parameters(output_dir)
    assert len(histories["uint8"]) == 3 and histories["uint8"] == pytest.approx(histories["float32"], rel=1e-6)
    for key, value in weights["float32"].items():
        torch.testing.assert_close(weights["uint8"][key], value, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")
    assert parse_arguments(["--output_dir", str(tmp_path)])[1].train_sample_dtype == "uint8"


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_accelerate_script_saves_and_evaluates_on_its_strategy_and_keeps_the_save_total_limit(
        tiny_model_dir, synthetic_dir, tmp_path, strategy):
    from hms_segmentation.training import train_accelerate

    # 4 frames in batches of 2: an epoch is 2 steps
    extra = ("--do_train", "--do_eval", "--max_steps", "6", "--save_strategy", strategy, "--eval_strategy", strategy,
             "--save_steps", "0.2", "--eval_steps", "3", "--save_total_limit", "2", "--primary_loss", "cross_entropy")
    output_dir = tmp_path / "run"
    train_accelerate.run_training(*parse_arguments(tiny_run_arguments(tiny_model_dir, synthetic_dir, output_dir, *extra)))
    checkpoints = sorted(folder.name for folder in output_dir.glob("checkpoint-*"))
    evaluated = [entry["step"] for entry in logged_history(output_dir, "accelerate") if "eval_mean_iou" in entry]
    if strategy == "steps":  # --save_steps 0.2: every ceil(6 * 0.2) = 2 steps, as the Trainer reads it
        assert checkpoints == ["checkpoint-4", "checkpoint-6"] and evaluated == [3, 6]
    else:
        assert checkpoints == ["checkpoint-4", "checkpoint-6"] and evaluated == [2, 4, 6]
    with pytest.raises(ValueError, match="--load_best_model_at_end"):
        train_accelerate.run_training(*parse_arguments(tiny_run_arguments(
            tiny_model_dir, synthetic_dir, tmp_path / "best", *extra, "--load_best_model_at_end", "--metric_for_best_model",
            "mean_iou")))


def test_the_saved_image_processor_shrinks_images_as_the_runs_evaluation_did(tmp_path):
    from hms_segmentation import HMSImageProcessor
    from hms_segmentation.training.arguments import DataArguments, ModelArguments
    from hms_segmentation.training.train import image_processor_for

    mapillary = DataArguments(dataset="mapillary", data_dir=str(tmp_path))  # the recipe evaluates at long side 2177
    assert image_processor_for(ModelArguments(), mapillary).max_long_side == 2177
    assert image_processor_for(ModelArguments(), DataArguments()).max_long_side is None  # full size
    HMSImageProcessor(size={"shortest_edge": 512}).save_pretrained(tmp_path / "start")
    (tmp_path / "start" / "config.json").write_text("{}")  # a folder --model_name_or_path accepts
    carried = image_processor_for(ModelArguments(model_name_or_path=str(tmp_path / "start")), mapillary)
    assert (carried.size["shortest_edge"], carried.max_long_side) == (512, 2177)  # its settings, the run's long side


def test_the_checkpoint_just_saved_survives_the_save_total_limit_after_a_rollback(tmp_path):
    """A run resumed from an earlier checkpoint saves a step below those it left behind: rotating by step number
    deleted the new checkpoint at once. As the Trainer: the oldest written go, never the one just saved."""
    import os

    from accelerate import Accelerator

    from hms_segmentation.training.train_accelerate import save_checkpoint

    for age, step in enumerate((300, 200)):  # checkpoint-300 written before checkpoint-200 (an earlier rollback)
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "hms_checkpoint.json").write_text(json.dumps({"step": step}))
        os.utime(folder, (1_000_000 + age, 1_000_000 + age))
    save_checkpoint(Accelerator(cpu=True), tmp_path, 150, total_limit=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-150", "checkpoint-200"]


# The quickstart refuses values it cannot run with, before it writes anything (review of the quickstart).


@pytest.mark.parametrize("flag, value, message", [
    # the Trainer reads max_steps <= 0 as "train num_train_epochs (3) epochs": 150 steps, reported as 0
    ("--max-steps", "0", "--max-steps must be at least 1, got 0"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--seed", "-1", "--seed must be >= 0, got -1"),  # numpy's "expected non-negative integer" after generating
    ("--learning-rate", "-0.1", "--learning-rate must be >= 0, got -0.1"),
    ("--frame-height", "16", "--frame-height must be at least 32 pixels, got 16"),  # a traceback from the generator
])
def test_quickstart_refuses_values_it_cannot_run_with_before_writing(tmp_path, capsys, flag, value, message):
    from hms_segmentation.cli import main as cli_main

    assert cli_main(["quickstart", "--output-dir", str(tmp_path / "qs"), flag, value]) == 2
    assert re.search(f"^error: {re.escape(message)}", capsys.readouterr().err, flags=re.MULTILINE)
    assert not (tmp_path / "qs").exists()  # nothing generated


def test_quickstart_refuses_an_output_dir_that_is_a_file_or_a_data_folder_of_the_user(tmp_path, capsys):
    from hms_segmentation.cli import main as cli_main

    (tmp_path / "notes.txt").write_text("mine")
    assert cli_main(["quickstart", "--output-dir", str(tmp_path / "notes.txt")]) == 2
    assert "error: --output-dir" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "qs" / "data").mkdir(parents=True)
    (tmp_path / "qs" / "data" / "photo.png").write_bytes(b"mine")  # not a synthetic dataset: used to be a traceback
    assert cli_main(["quickstart", "--output-dir", str(tmp_path / "qs"), "--max-steps", "1"]) == 2
    assert "is not a synthetic dataset written by this tool" in capsys.readouterr().err
    assert [path.name for path in (tmp_path / "qs").rglob("*")] == ["data", "photo.png"]
    assert (tmp_path / "qs" / "data" / "photo.png").read_bytes() == b"mine"


def test_quickstart_refuses_a_synthetic_dataset_of_other_settings_even_with_overwrite(tmp_path, capsys):
    from hms_segmentation.cli import main as cli_main
    from hms_segmentation.data.synthesize import GENERATOR_VERSION, MARKER_FILE

    data = tmp_path / "qs" / "data"
    data.mkdir(parents=True)
    marker = {"version": GENERATOR_VERSION, "num_train": 200, "num_val": 50, "height": 256, "width": 512}
    (data / MARKER_FILE).write_text(json.dumps(marker))
    # it used to train on the 200 frames found while its report said 8
    argv = ["quickstart", "--output-dir", str(tmp_path / "qs"), "--overwrite", "--train-frames", "8", "--val-frames",
            "50", "--frame-height", "256", "--frame-width", "512"]
    assert cli_main(argv) == 2
    assert "holds a synthetic dataset of other settings than those asked for (num_train=200)" in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "qs").rglob("*")) == sorted(["data", MARKER_FILE])
