"""Run folders: what the main job and notebooks write, read back; and the alpha sweep against direct scores."""

import pytest
import torch

import refusal_lens as rl

from .conftest import PROMPTS


def test_run_folder_round_trips_directions_selection_and_the_direction(tiny_model, tmp_path):
    run = rl.open_run(tiny_model, tmp_path)
    assert run.path == tmp_path / rl.runs.run_slug(tiny_model.info.spec) and run.path.is_dir()
    assert run.figures == run.path / "figures"
    assert rl.open_run("Qwen/Qwen-1_8B-chat", tmp_path, create=False).path.name == "Qwen__Qwen-1_8B-chat"
    assert rl.open_run(tiny_model, tmp_path, figures=tmp_path / "fig").figures == tmp_path / "fig"
    with pytest.raises(FileNotFoundError, match="notebook 02"):
        run.selected()
    directions = rl.diff_in_means(tiny_model, PROMPTS, ["Tell me a joke.", "Name a colour.", "Count to three."])
    run.save_directions(directions)
    run.save_selected(-1, 1, "test")
    loaded, pos, layer = run.selected()
    assert (pos, layer) == (-1, 1)
    torch.testing.assert_close(loaded.vectors, directions.vectors, rtol=0, atol=0)
    vector = directions.vector(-1, 1)
    path = run.save_direction(vector, layer=1, position=-1, source="test")
    torch.testing.assert_close(rl.load_direction(path, tiny_model, normalize=False), vector, rtol=0, atol=0)
    torch.testing.assert_close(rl.load_direction(path, tiny_model), (vector / vector.norm()).float())


def test_alpha_sweep_equals_refusal_scores_under_partial_ablation(tiny_model):
    v = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(2)), dim=0)
    sweep = rl.alpha_sweep(tiny_model, v, PROMPTS, [0.0, 0.5, 1.0])
    assert sweep.refusal_score[0] == pytest.approx(float(rl.refusal_score(tiny_model, PROMPTS).mean()))
    half = rl.refusal_score(tiny_model, PROMPTS, hooks=rl.ablate(tiny_model, v, alpha=0.5).hooks).mean()
    assert sweep.refusal_score[1] == pytest.approx(float(half)) and sweep.refusal_score[2] != sweep.refusal_score[0]
