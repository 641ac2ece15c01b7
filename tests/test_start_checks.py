"""Every name and option of a config is checked when the experiment starts, before anything is
written: a misspelled model, a bad model option, a strategy option, a strategy that needs SAM, SAM
weights that are not there. A refused start leaves no work dir and starts no Ray."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchestrator import ActiveLearningLoop, config_from_dict
from orchestrator._cli import main as shoal_main

from .conftest import ROOT, tiny_config, tiny_overrides


@pytest.mark.parametrize("sections, error, message", [
    ({"model": {"name": "segformerx"}}, ValueError, r"model: unknown model 'segformerx'; registered: segformer, unet"),
    ({"model": {"name": "unet", "options": {"base_chanels": 8}}}, ValueError,
     r"model: model 'unet' has no option 'base_chanels'; valid options: base_channels, depth, dropout, norm"),
    ({"model": {"name": "unet", "options": {"norm": "layer"}}}, ValueError, r"model: unet option 'norm' must be"),
    ({"model": {"name": "segformer", "options": {"config": {"hiden_sizes": [8]}}}}, ValueError, r"'hiden_sizes'"),
    ({"loop": {"strategy": "sam_disagreement"}}, ValueError, r"reads SAM agreement columns; set sam.enabled"),
    ({"loop": {"strategy": "fusion", "strategy_options": {"members": {"entropy": 1, "sam_disagreement": 1}}},
      "sam": {"enabled": True, "model_type": "tiny", "checkpoint": "/nowhere/sam.pth"}},
     FileNotFoundError, r"sam.checkpoint: /nowhere/sam.pth does not exist"),
])
def test_a_bad_name_or_option_refuses_the_start_and_writes_nothing(
    tmp_path: Path, sections: dict, error: type[Exception], message: str
) -> None:
    loop = ActiveLearningLoop(config_from_dict(tiny_config(**sections)), tmp_path / "work")
    with pytest.raises(error, match=message):
        loop.start()
    assert not (tmp_path / "work").exists()
    assert loop.state is None


def test_a_strategy_option_is_refused_when_the_loop_is_built(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="strategy 'entropy' has no option 'aggregaton'"):
        ActiveLearningLoop(config_from_dict(tiny_config(loop={"strategy_options": {"aggregaton": "topk"}})),
                           tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_the_cli_refuses_a_misspelled_model_before_ray_or_the_work_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "work"
    args = ["run", "--config", str(ROOT / "configs/quickstart.yaml"), "--workdir", str(workdir), *tiny_overrides(),
            "--set", "model.name=segformerx"]
    assert shoal_main(args) == 2
    err = capsys.readouterr().err
    assert "shoal: error: model: unknown model 'segformerx'; registered: segformer, unet" in err
    assert "Traceback" not in err
    assert not workdir.exists()
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()
