"""igpt_kernels._triton: the autotuning log that gpu_check.sh brings back from a GPU."""

import json
from types import SimpleNamespace

import torch

from igpt_kernels import _triton


class _FakeTuner:
    """Stands in for triton's Autotuner: a launch with a new key tunes and fills the cache."""

    def __init__(self, configs, key):
        self.configs, self.cache, self.configs_timings = configs, {}, {}
        self.base_fn = SimpleNamespace(__name__="_fake_kernel")

    def __getitem__(self, grid):
        def run(x, n):
            if n not in self.cache:
                self.configs_timings = {c: [0.5 * (i + 1)] for i, c in enumerate(self.configs)}
                self.cache[n] = self.configs[0]

        return run


def test_autotune_log_writes_one_line_per_new_key(monkeypatch, tmp_path):
    log = tmp_path / "autotune.jsonl"
    monkeypatch.setattr(_triton, "AUTOTUNE", True)
    monkeypatch.setattr(_triton, "AUTOTUNE_LOG", str(log))
    monkeypatch.setattr(
        _triton.triton, "autotune", lambda configs, key: lambda fn: _FakeTuner(configs, key)
    )
    tuned = _triton.Tuned(kernel=None, config_list=["cfg-a", "cfg-b"], key=["n"])
    x = torch.zeros(1)
    for n in (8, 8, 16):  # the second launch with n=8 is a cache hit: no new line
        tuned.launch(lambda meta: (1,), x, n)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["keys"] for r in rows] == [["8"], ["16"]]
    assert rows[0]["kernel"] == "_fake_kernel" and rows[0]["best"] == "cfg-a"
    assert rows[0]["ms"] == {"cfg-a": [0.5], "cfg-b": [1.0]}


def test_no_log_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.setattr(_triton, "AUTOTUNE", True)
    monkeypatch.setattr(_triton, "AUTOTUNE_LOG", None)
    monkeypatch.setattr(
        _triton.triton, "autotune", lambda configs, key: lambda fn: _FakeTuner(configs, key)
    )
    monkeypatch.chdir(tmp_path)
    _triton.Tuned(kernel=None, config_list=["cfg-a"], key=["n"]).launch(
        lambda meta: (1,), torch.zeros(1), 4
    )
    assert list(tmp_path.iterdir()) == []
