"""params/*.yaml: strict reading, the experiment matrix, hashes."""

from collections import Counter
from pathlib import Path

import pytest
import yaml

from remamber.config import ConfigError, ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "params" / "paper.yaml"
DEMO = ROOT / "params" / "demo.yaml"


def _write_variant(tmp_path, edit, name="demo.yaml"):
    raw = yaml.safe_load(DEMO.read_text())
    # inline the shared matrix file so that edits can reach the tables
    raw["experiments"]["tables"] = yaml.safe_load((DEMO.parent / raw["experiments"]["tables"]).read_text())["tables"]
    edit(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_paper_and_demo_load_with_model_check():
    paper = ExperimentConfig.from_yaml(PAPER)
    demo = ExperimentConfig.from_yaml(DEMO)
    assert paper.name == "paper" and demo.name == "demo"
    assert paper.train.epochs == 50 and paper.train.betas == (0.9, 0.999)
    assert paper.train.lr_new == 5e-5 and paper.train.lr_pretrained == 2.5e-5
    assert paper.data.datasets["refcocog"].split_by == "umd"
    assert paper.data.datasets["refcocog"].splits == ("val", "test")
    assert paper.model["backbone"] == "vmamba_base"
    high = yaml.safe_load(DEMO.read_text())["experiments"]["resolutions"]["high"]
    assert demo.tables["table2"] == {"resolution": high, "datasets": ["refcoco", "refcoco+", "refcocog"],
                                     "variants": ["twister"], "controls": []}
    from remamber.engine.jobs import model_config

    assert model_config(demo, "local_only").to_dict()["backbone"] == "vmamba_demo"


def test_paper_matrix_jobs_and_evaluations():
    cfg = ExperimentConfig.from_yaml(PAPER, check_model=False)
    jobs = cfg.jobs()
    assert len(jobs) == 21
    # Each job is owned by the first table that uses it: 12 + 3 + 4 + 2.
    assert Counter(j.experiment for j in jobs) == {"table1": 12, "table2": 3, "table3": 4, "table4": 2}
    assert len({(j.dataset, j.variant, j.resolution) for j in jobs}) == 21
    shared = cfg.find_job("refcoco", "twister", 256)
    assert shared.tables == ("table1", "table3", "table4") and shared.experiment == "table1"
    assert cfg.find_job("refcocog", "twister", 480).tables == ("table2",)
    assert all(j.resolution == (480 if j.experiment == "table2" else 256) for j in jobs)
    # Evaluations, by hand: table1 4 variants x (3 + 3 + 2 splits) = 32; table2 (3 + 3 + 2) = 8;
    # table3 4 new refcoco jobs x 3 = 12; table4 2 new x 3 = 6 -> 58.
    evals = cfg.evaluations()
    assert len(evals) == 58
    assert ("refcocog", "test") in {(j.dataset, s) for j, s in evals}
    assert cfg.run_key("refcoco+", "twister", 480) == "paper/refcoco+/twister/480"
    with pytest.raises(ConfigError, match="no training job refcoco/twister/999"):
        cfg.find_job("refcoco", "twister", 999)


def test_typo_names_file_and_key_path(tmp_path):
    path = _write_variant(tmp_path, lambda r: r["train"].__setitem__("epocs", 3))
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_yaml(path, check_model=False)
    msg = str(err.value)
    assert msg.startswith(f"{path}: train.epocs: unknown key; valid: epochs, global_batch_size")

    nested = _write_variant(tmp_path, lambda r: r["data"]["datasets"]["refcoco"].__setitem__("split", "x"))
    with pytest.raises(ConfigError, match=r"data\.datasets\.refcoco\.split: unknown key"):
        ExperimentConfig.from_yaml(nested, check_model=False)

    top = _write_variant(tmp_path, lambda r: r.__setitem__("trian", {}))
    with pytest.raises(ConfigError, match=r"demo\.yaml: trian: unknown key; valid: name, results, data"):
        ExperimentConfig.from_yaml(top, check_model=False)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda r: r["train"].__setitem__("epochs", "four"), r"train\.epochs: expected an integer, got 'four'"),
        (lambda r: r["train"].__setitem__("amp", "yes"), r"train\.amp: expected true or false"),
        (lambda r: r["train"].__setitem__("betas", [0.9]), r"train\.betas: expected a list of two numbers"),
        (lambda r: r["train"].__setitem__("epochs", 0), r"train\.epochs: must be >= 1, got 0"),
        (lambda r: r["train"].pop("seed"), r"train\.seed: missing key"),
        (lambda r: r["train"].__setitem__("global_batch_size", 20),
         r"train\.global_batch_size: 20 is not a multiple of train\.per_device_batch_size 32"),
        (lambda r: r["evaluate"].__setitem__("protocol", "lavt"),
         r"evaluate\.protocol: 'lavt' is not one of original, input"),
        (lambda r: r["data"].__setitem__("mask_mode", "sum"), r"data\.mask_mode: 'sum' is not one of"),
        (lambda r: r["tracking"].__setitem__("on_error", "ignore"), r"tracking\.on_error"),
        (lambda r: r["experiments"]["tables"]["table2"].__setitem__("resolution", "huge"),
         r"experiments\.tables\.table2\.resolution: 'huge' is not in experiments\.resolutions"),
        (lambda r: r["experiments"]["tables"]["table3"].__setitem__("datasets", ["refclef"]),
         r"experiments\.tables\.table3\.datasets: 'refclef' is not in data\.datasets"),
        (lambda r: r["experiments"]["resolutions"].__setitem__("low", 64.5),
         r"experiments\.resolutions\.low: expected an integer"),
    ],
)
def test_bad_values_are_named(tmp_path, edit, pattern):
    path = _write_variant(tmp_path, edit)
    with pytest.raises(ConfigError, match=pattern) as err:
        ExperimentConfig.from_yaml(path, check_model=False)
    assert str(err.value).startswith(str(path))


def test_model_section_and_variants_checked_through_models(tmp_path):
    from remamber.engine.jobs import check_model_section

    bad_key = _write_variant(tmp_path, lambda r: r["model"].__setitem__("backbon", "vmamba_demo"))
    with pytest.raises(ConfigError, match=r"demo\.yaml: model \(variant '\w+'\): .*backbon"):
        check_model_section(ExperimentConfig.from_yaml(bad_key))
    # Shape-only reading succeeds without the model check.
    ExperimentConfig.from_yaml(bad_key, check_model=False)
    bad_variant = _write_variant(
        tmp_path, lambda r: r["experiments"]["tables"]["table4"]["variants"].append("global_locla"))
    with pytest.raises(ConfigError, match=r"experiments\.tables\.table4\.variants: unknown variant 'global_locla'"):
        ExperimentConfig.from_yaml(bad_variant)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        ExperimentConfig.from_yaml(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        ExperimentConfig.from_yaml(broken)


def test_hash_and_round_trip(tmp_path):
    cfg = ExperimentConfig.from_yaml(DEMO, check_model=False)
    # Same content, other key order and formatting -> same hash; `1e-3` read as a string by YAML -> same.
    raw = yaml.safe_load(DEMO.read_text())
    reordered = {k: raw[k] for k in reversed(list(raw))}
    reordered["train"] = {k: raw["train"][k] for k in reversed(list(raw["train"]))}
    reordered["train"]["lr_new"] = "1e-3"
    path = tmp_path / "reordered.yaml"
    path.write_text(yaml.safe_dump(reordered, sort_keys=True, default_flow_style=True))
    (tmp_path / "matrix.yaml").write_text((DEMO.parent / "matrix.yaml").read_text())
    other = ExperimentConfig.from_yaml(path, check_model=False)
    assert other.train.lr_new == 1e-3
    assert other.config_hash() == cfg.config_hash()
    assert other == cfg
    changed = _write_variant(tmp_path, lambda r: r["train"].__setitem__("seed", 1), name="seed1.yaml")
    assert ExperimentConfig.from_yaml(changed, check_model=False).config_hash() != cfg.config_hash()
    again = ExperimentConfig.from_dict(cfg.to_dict(), check_model=False)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert cfg.to_dict()["train"]["betas"] == [0.9, 0.999]


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from remamber.config import ExperimentConfig; "
            f"ExperimentConfig.from_yaml({str(PAPER)!r}, check_model=False); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_freeze_text_encoder_optional_key(tmp_path):
    """train.freeze_text_encoder: optional (default false), a bool, and absent == false in the hash, so
    params files written before the key existed keep their hash (and their checkpoints stay resumable)."""
    absent = ExperimentConfig.from_yaml(
        _write_variant(tmp_path, lambda r: r["train"].pop("freeze_text_encoder", None), "absent.yaml"),
        check_model=False)
    false = ExperimentConfig.from_yaml(
        _write_variant(tmp_path, lambda r: r["train"].__setitem__("freeze_text_encoder", False), "false.yaml"),
        check_model=False)
    true = ExperimentConfig.from_yaml(
        _write_variant(tmp_path, lambda r: r["train"].__setitem__("freeze_text_encoder", True), "true.yaml"),
        check_model=False)
    assert absent.train.freeze_text_encoder is False and true.train.freeze_text_encoder is True
    assert absent.config_hash() == false.config_hash() != true.config_hash()
    assert absent.to_dict()["train"]["freeze_text_encoder"] is False
    assert ExperimentConfig.from_dict(true.to_dict(), check_model=False) == true
    bad = _write_variant(tmp_path, lambda r: r["train"].__setitem__("freeze_text_encoder", "yes"), "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.freeze_text_encoder: expected true or false"):
        ExperimentConfig.from_yaml(bad, check_model=False)
    # The Snakefile's JSON schema accepts the key and refuses a non-boolean.
    import jsonschema

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    jsonschema.validate(true.to_dict(), schema)
    with pytest.raises(jsonschema.ValidationError, match="freeze_text_encoder|'yes'"):
        jsonschema.validate(yaml.safe_load(bad.read_text()), schema)


def test_paper_and_demo_share_one_matrix_file(tmp_path):
    paper, demo = ExperimentConfig.from_yaml(PAPER), ExperimentConfig.from_yaml(DEMO)
    assert yaml.safe_load(PAPER.read_text())["experiments"]["tables"] == "matrix.yaml"
    assert yaml.safe_load(DEMO.read_text())["experiments"]["tables"] == "matrix.yaml"
    assert paper.experiments.tables == demo.experiments.tables  # same matrix, other pixel sizes
    assert [(j.dataset, j.variant) for j in paper.jobs()] == [(j.dataset, j.variant) for j in demo.jobs()]
    assert demo.to_dict()["experiments"]["tables"]["table1"]["controls"]  # inlined: checkpoints are self-contained
    raw = yaml.safe_load(DEMO.read_text())
    raw["experiments"]["tables"] = "nope.yaml"
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"x\.yaml: experiments\.tables: cannot read the matrix file .*nope\.yaml"):
        ExperimentConfig.from_yaml(tmp_path / "x.yaml")


def test_schema_file_is_generated_from_the_one_validator():
    """workflow/schemas/config.schema.yaml is `python -m remamber.config`'s output: the same rules as
    remamber.config, not a second hand-written copy (regenerate it after changing a checker)."""
    import subprocess
    import sys

    import jsonschema

    from remamber.config import json_schema

    committed = (ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text()
    generated = subprocess.run([sys.executable, "-m", "remamber.config"], check=True, capture_output=True,
                               text=True).stdout
    assert committed == generated, "regenerate: python -m remamber.config > workflow/schemas/config.schema.yaml"
    schema = yaml.safe_load(committed)
    assert schema == json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in (PAPER, DEMO):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)  # as written (matrix file named)
        jsonschema.validate(ExperimentConfig.from_yaml(path).to_dict(), schema)  # normalised (matrix inlined)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda r: r.__setitem__("name", "my run"), r"demo\.yaml: name: 'my run' does not match"),
        (lambda r: r["experiments"]["tables"]["table1"].__setitem__("controls", ["shuffled"]),
         r"experiments\.tables\.table1\.controls: unknown control 'shuffled'"),
        (lambda r: r["data"]["datasets"]["refcoco"].__setitem__("splits", ["train", "val"]),
         r"data\.datasets\.refcoco\.splits: lists the evaluated splits"),
        (lambda r: r["tracking"].__setitem__("uri", 3), r"tracking\.uri: expected a non-empty string, got 3"),
    ],
)
def test_validator_and_generated_schema_refuse_the_same_files(tmp_path, edit, pattern):
    import jsonschema

    from remamber.config import json_schema

    path = _write_variant(tmp_path, edit)
    with pytest.raises(ConfigError, match=pattern):
        ExperimentConfig.from_yaml(path, check_model=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(path.read_text()), json_schema())


def test_tracking_section_is_the_arguments_of_the_one_tracking_class():
    from remamber.tracking import TrackingConfig

    cfg = ExperimentConfig.from_yaml(DEMO, check_model=False)
    assert TrackingConfig(**cfg.tracking) == TrackingConfig.from_dict(yaml.safe_load(DEMO.read_text())["tracking"])
    import remamber.config

    assert not hasattr(remamber.config, "TrackingSection")
