"""benchmarks.cluster_scaling: bad arguments are refused before a cluster starts, and the measurements
behind its "where the time goes" (the CPU census, the trials' time lines) add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("flag", ["--trials", "--trial-epochs", "--num-train", "--cache-samples", "--read-rounds"])
def test_non_positive_counts_are_refused_naming_the_flag(flag):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cluster_scaling", flag, "0"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"{flag} must be >= 1, got 0" in done.stderr
    assert "load average" not in done.stdout  # nothing was started


def test_the_cpu_census_charges_a_process_that_burns_cpu_while_it_samples():
    """The census behind the benchmark's "where the time goes": a process that burns ~1 CPU-s while
    it samples is charged for it (outside the cluster: it is in no namespace the census watches)."""
    from benchmarks._cpu_census import OUTSIDE, CpuCensus

    census = CpuCensus({}, interval=0.1).start()
    # The marker at the start of its command line makes it a "trial" to the census (a Tune trial actor's title).
    marker = f"ray::ImplicitFunc census-test-{os.getpid()}"
    burn = f"# {marker}\nimport time\nend = time.process_time() + 1.5\nwhile time.process_time() < end: pass\ntime.sleep(0.3)"
    subprocess.run([sys.executable, "-c", burn], check=True, timeout=120)
    report = census.stop()
    assert report.cpu.get((OUTSIDE, "trial"), 0.0) >= 1.2
    assert report.seconds >= 1.5 and report.load_1min and report.machine_busy_cpu_s >= 1.2
    (trial,) = [trial for trial in report.trials if marker in trial.title]  # other trials may run meanwhile
    assert trial.busiest_thread_cpu_s >= 1.2 and trial.other_threads_cpu_s < 0.3  # one thread computes
    assert 0.0 < trial.peak_cores < 1.3  # one thread cannot use more than about one core
    assert "outside" in report.table() and "busiest thread" in report.table()


def test_trial_timeline_reads_each_trials_set_up_epochs_and_gap_from_its_tune_results(tmp_path):
    from benchmarks.cluster_scaling import trial_timeline

    def trial(name: str, node: str, start: float, epochs: list[float], finish: float, pid: int = 7) -> dict:
        directory = tmp_path / name
        (directory / "checkpoint_000000").mkdir(parents=True)
        now, total, rows = start, 0.0, []
        for index, seconds in enumerate([*epochs, finish]):
            took = seconds + (5.0 if index == 0 else 0.0)  # the first report also holds the set-up
            now, total = now + took, total + took
            row = {"timestamp": now, "time_this_iter_s": took, "time_total_s": total, "node_ip": node, "pid": pid}
            rows.append({**row, "epoch_seconds": seconds} if index < len(epochs) else row)
        (directory / "result.json").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
        return {"trial_id": name, "checkpoint": str(directory / "checkpoint_000000")}

    results = {
        "trials": [
            trial("a", "n1", 100.0, [2.0, 2.0], 3.0),
            trial("b", "n1", 120.0, [1.0], 4.0),  # in a's process (Tune reused the actor)
            trial("c", "n2", 101.0, [1.0], 1.0),
            trial("d", "n2", 115.0, [1.0], 1.0, pid=8),  # a new process on n2
        ]
    }
    first, third, fourth, second = trial_timeline(results, origin=90.0)
    assert (first["trial"], first["start"], first["setup_s"], first["epochs_s"]) == ("a", 10.0, 5.0, 4.0)
    assert first["gap_s"] == 10.0 and first["end"] == 22.0 and first["end_s"] == 3.0 and first["new_process"]
    assert second["gap_s"] == 120.0 - 112.0 and not second["new_process"]  # after trial a, in its process
    assert fourth["new_process"] and fourth["gap_s"] == 115.0 - 108.0

    from benchmarks.cluster_scaling import node_accounts

    accounts = node_accounts([first, second, third, fourth], stage_seconds=50.0)
    assert accounts["n1"] == {
        "trials": 2,
        "trainable_s": 22.0,  # 12 + 10
        "before_first_s": 10.0,
        "gaps_reused_s": 8.0,
        "gaps_new_process_s": 0.0,
        "new_processes": 1,
        "idle_after_s": 50.0 - 40.0,
    }
    assert accounts["n2"]["gaps_new_process_s"] == 7.0 and accounts["n2"]["new_processes"] == 2


def test_scaling_line_pairs_the_same_configurations_and_bounds_the_figure_by_the_best_split(tmp_path, capsys):
    from benchmarks.cluster_scaling import best_split, describe_scaling

    def results(arm: str, trainable_s: list[float], search_s: float) -> dict:
        trials = []
        for index, seconds in enumerate(trainable_s):
            directory = tmp_path / arm / str(index)
            (directory / "checkpoint_000000").mkdir(parents=True)
            row = {"timestamp": 100.0 + seconds, "time_this_iter_s": seconds, "time_total_s": seconds, "node_ip": "n"}
            (directory / "result.json").write_text(json.dumps(row) + "\n")
            trials.append(
                {
                    "trial_id": f"{arm}{index}",
                    "config": {"width": index},
                    "checkpoint": str(directory / "checkpoint_000000"),
                }
            )
        return {"trials": trials, "stages": {"search": {"seconds": search_s}}}

    assert best_split([66.5, 36.1, 35.0, 22.1]) == 88.6  # {66.5, 22.1} vs {36.1, 35.0}
    assert best_split([1.0] * 25) == 13.0  # above 20 trials: longest first, greedy
    # The 1-node search: 160 s of trials in 168 s; the 2-node one ran each configuration 1.25x slower.
    describe_scaling(results("one", [40.0, 40.0, 40.0, 40.0], 168.0), results("two", [50.0, 50.0, 50.0, 50.0], 110.0))
    line = capsys.readouterr().out
    assert "each trial ran 1.25x its time alone" in line and "40.0->50.0" in line
    assert "best split of the 1-node trial times over 2 nodes is 80.0 / 80.0 s" in line
    assert f"at most {168.0 / 88.0:.2f} with no slowdown and {168.0 / 108.0:.2f} with this one" in line
