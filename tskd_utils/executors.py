"""Where the runs of a sweep execute: here, as Ray tasks, or as a SLURM array job (docs/cluster.md).

Every executor calls the same function for a run, :func:`tskd_utils.reproduce.run_one` (lock the run folder,
check what a finished run claims, resume, check again), so skip / resume / go-on-past-failure behave the same
everywhere. The remote executors follow each run through its ``status.json`` (the run folders live on storage that
every node sees) and print the same progress lines as a local sweep; a run whose worker dies (a killed Ray worker,
a dead node, a cancelled or timed-out SLURM job) is reported like a failing run, and re-running the sweep resumes it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import MACHINES
from .runner import NOTEBOOKS, RunSpec, SweepError, _fmt, read_status, record_lost, run_one

POLL_S = 2.0  # how often a remote driver looks at the runs' status.json
CLUSTER_HINT = 'pip install -e ".[cluster]"'

OnDone = Callable[[RunSpec, dict], None]


def run_resources(profile: str, cpus: Optional[int] = None, gpus: Optional[int] = None) -> tuple[int, int]:
    m = MACHINES.get(profile)  # what one run asks a scheduler for: the profile's, else 2 CPUs
    c, g = (m.cpus, m.gpus) if m is not None else (2, 0)
    c, g = (c if cpus is None else int(cpus)), (g if gpus is None else int(gpus))
    if c < 1 or g < 0:
        raise SweepError(f"a run needs at least 1 CPU and >= 0 GPUs, got --cpus-per-run {c} --gpus-per-run {g}")
    return c, g


class Progress:
    """Print a remote run's notebook transitions from its status.json, as a local sweep prints them."""

    def __init__(self):
        self.seen: dict = {}

    def poll(self, specs: Sequence[RunSpec]) -> None:
        for spec in specs:
            try:
                status = read_status(Path(spec.run_dir))
            except OSError:
                continue
            started = status.get("started")
            if not started or status.get("attempt") != spec.attempt:  # not started yet, or an earlier attempt's
                continue
            for nb in NOTEBOOKS:  # every notebook this attempt started, even one that began and ended between polls
                entry = status["notebooks"].get(nb, {})
                key = (spec.run_dir, nb, entry.get("started"))
                if entry.get("started") and entry["started"] >= started and key not in self.seen:
                    self.seen[key] = True
                    print(f"{spec.label}: {nb} (elapsed {_fmt(entry['started'] - started)})", flush=True)


class Executor:
    name = "local"
    announces = True  # whether the worker prints progress itself (it runs in this process)

    def run(self, specs: Sequence[RunSpec], on_done: OnDone) -> None:
        raise NotImplementedError


class LocalExecutor(Executor):
    """Here, one run after another (the sweep's process executes the notebooks' kernels)."""

    def __init__(self, **_):
        pass

    def run(self, specs: Sequence[RunSpec], on_done: OnDone) -> None:
        import traceback

        for spec in specs:
            try:
                status = run_one(spec)
            except Exception as e:  # the sweep itself must go on
                traceback.print_exc()
                status = {"state": "failed", "notebook": "sweep", "error": f"{type(e).__name__}: {e}", "notebooks": {}}
            on_done(spec, status)


def _lost_reason(kind: str, e: BaseException) -> str:
    text = str(e).strip().splitlines()
    detail = next((line for line in text if line.strip()), "")
    return f"{kind} ({type(e).__name__}{': ' + detail[:300] if detail else ''}); re-run the sweep to resume the run"


def _check_reachable(address: Optional[str], timeout: float = 5.0) -> None:
    """A host:port (or ray://host:port) address must accept a TCP connection; "auto" and the like are left to Ray."""
    import re
    import socket

    m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", str(address or ""))
    if not m:
        return
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout).close()
    except OSError as e:
        raise SweepError(f"--ray-address {address}: nothing answers there ({e.strerror or e}); start the cluster "
                         f"(ray start --head) or check the address (ray status on the head node)") from None


class RayExecutor(Executor):
    """One Ray task per run, with the CPUs (and GPU) its profile needs; tasks are not retried by Ray (a run whose
    worker or node dies is reported, and resumed by the next sweep)."""

    name = "ray"
    announces = False

    def __init__(self, profile: str, address: Optional[str] = None, cpus_per_run: Optional[int] = None,
                 gpus_per_run: Optional[int] = None, log_output: bool = False, **_):
        try:
            import ray
        except ImportError:
            raise SweepError(f"--executor ray needs Ray: {CLUSTER_HINT}") from None
        self.address, self.log_output = address, log_output
        self.cpus, self.gpus = run_resources(profile, cpus_per_run, gpus_per_run)
        if not ray.is_initialized():  # Ray itself retries an unreachable address for minutes
            import os

            _check_reachable(address or os.environ.get("RAY_ADDRESS"))

    def _check_resources(self, ray, local_runtime: bool) -> None:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        best_cpu = max((r.get("CPU", 0) for r in nodes), default=0)
        best_gpu = max((r.get("GPU", 0) for r in nodes), default=0)
        if best_cpu >= self.cpus and best_gpu >= self.gpus:
            return
        msg = (f"a run asks for {self.cpus} CPU(s) and {self.gpus} GPU(s), but the largest Ray node has "
               f"{best_cpu:g} CPU(s) and {best_gpu:g} GPU(s)")
        if local_runtime:
            raise SweepError(msg + "; pass --cpus-per-run / --gpus-per-run, or --ray-address for a cluster that has them")
        print(f"warning: {msg}; the runs wait until such a node joins the cluster", flush=True)

    def run(self, specs: Sequence[RunSpec], on_done: OnDone) -> None:
        import os

        import ray
        from ray.exceptions import RayError, RayTaskError

        started_here, local_runtime = False, False
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS")
            try:
                if address:
                    ray.init(address=address, log_to_driver=self.log_output)
                else:
                    ray.init(include_dashboard=False, log_to_driver=self.log_output)
            except Exception as e:  # no cluster at that address, a version mismatch, ...
                where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
                raise SweepError(f"--executor ray: could not start or reach {where}: {type(e).__name__}: "
                                 f"{str(e).strip()[:300]}") from None
            started_here, local_runtime = True, not address
        try:
            self._check_resources(ray, local_runtime)
            task = ray.remote(run_one)
            # the project's environment settings (TSKD_*) travel with the task; the rest is the node's own
            env = {k: v for k, v in os.environ.items() if k.startswith("TSKD_")}
            refs = {}
            for spec in specs:
                ref = task.options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0, retry_exceptions=False,
                                   name=Path(spec.run_dir).name,
                                   **({"runtime_env": {"env_vars": env}} if env else {})).remote(spec)
                refs[ref] = spec
            res = ray.cluster_resources()
            print(f"ray: {len(specs)} run(s) submitted ({self.cpus} CPU, {self.gpus} GPU each; cluster "
                  f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU)", flush=True)
            progress, pending = Progress(), list(refs)
            try:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
                    progress.poll(specs)
                    for ref in ready:
                        spec = refs[ref]
                        try:
                            status = ray.get(ref)
                        except RayTaskError as e:  # run_one itself raised: a bug, reported like a failure
                            status = record_lost(spec, _lost_reason("the run's Ray task raised", e.cause or e))
                        except RayError as e:  # the worker or its node died, the object was lost, ...
                            status = record_lost(spec, _lost_reason("the Ray worker executing it died", e))
                        on_done(spec, status)
            except KeyboardInterrupt:
                for ref in pending:
                    ray.cancel(ref, force=True)
                print(f"interrupted: {len(pending)} Ray task(s) cancelled; re-run the sweep to resume them", flush=True)
                raise
        finally:
            if started_here:
                ray.shutdown()


class SlurmExecutor(Executor):
    """All runs as one SLURM array job through submitit (``cluster="local"``: submitit's local executor)."""

    name = "slurm"
    announces = False

    def __init__(self, profile: str, out: Path, cpus_per_run: Optional[int] = None,
                 gpus_per_run: Optional[int] = None, partition: Optional[str] = None, time_min: Optional[int] = None,
                 mem_gb: Optional[int] = None, account: Optional[str] = None, qos: Optional[str] = None,
                 parallelism: Optional[int] = None, setup: Sequence[str] = (), extra: Optional[dict] = None,
                 cluster: str = "slurm", **_):
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise SweepError(f"--executor slurm needs submitit: {CLUSTER_HINT}") from None
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise SweepError("--executor slurm: sbatch not found: start the sweep on a SLURM login node (or pass "
                             "--slurm-cluster local to try the SLURM path on this machine)")
        if parallelism is not None and parallelism < 1:
            raise SweepError(f"--slurm-parallelism {parallelism}: at least 1")
        self.cpus, self.gpus = run_resources(profile, cpus_per_run, gpus_per_run)
        self.folder = Path(out) / "_slurm"
        self.cluster = cluster
        self.params = {"timeout_min": int(time_min or (MACHINES[profile].slurm_minutes if profile in MACHINES else 180)), "name": "tskd-sweep",
                       "cpus_per_task": self.cpus, "gpus_per_node": self.gpus}
        if mem_gb:
            self.params["mem_gb"] = int(mem_gb)
        slurm = {"slurm_partition": partition, "slurm_account": account, "slurm_qos": qos,
                 "slurm_array_parallelism": parallelism, "slurm_setup": list(setup) or None,
                 "slurm_additional_parameters": dict(extra) if extra else None}
        self.params.update({k: v for k, v in slurm.items() if v is not None})

    def run(self, specs: Sequence[RunSpec], on_done: OnDone) -> None:
        import submitit

        executor = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=self.cluster)
        params = dict(self.params)
        if self.cluster == "local":  # the local executor knows only these
            params = {k: v for k, v in params.items() if k in ("timeout_min", "gpus_per_node", "name")}
        executor.update_parameters(**params)
        try:
            jobs = executor.map_array(run_one, list(specs))
        except Exception as e:  # sbatch refused the job (unknown partition, account, time above the limit, ...)
            raise SweepError(f"--executor slurm: the array job was not accepted: {type(e).__name__}: "
                             f"{str(e).strip()[:500]}") from None
        try:
            (self.folder / "%j").rmdir()  # an empty placeholder submitit leaves beside the job folders
        except OSError:
            pass
        ids = sorted({j.job_id.split("_")[0] for j in jobs})
        print(f"slurm: {len(jobs)} run(s) submitted as job {', '.join(ids)} ({self.cpus} CPU, {self.gpus} GPU, "
              f"{params['timeout_min']} min each; logs {self.folder})", flush=True)
        by_job = dict(zip(jobs, specs))
        progress, pending = Progress(), list(jobs)
        try:
            while pending:
                time.sleep(POLL_S)
                progress.poll(specs)
                still = []
                for job in pending:
                    if not job.done():
                        still.append(job)
                        continue
                    spec = by_job[job]
                    try:
                        status = job.result()
                    except Exception as e:  # FailedJobError, UncompletedJobError (killed, timed out, preempted)
                        status = record_lost(spec, _lost_reason(f"SLURM job {job.job_id} ended without a result "
                                                                f"(log {job.paths.stderr})", e))
                    on_done(spec, status)
                pending = still
        except KeyboardInterrupt:
            for job in pending:
                job.cancel(check=False)
            print(f"interrupted: {len(pending)} SLURM job(s) cancelled; re-run the sweep to resume them", flush=True)
            raise


def make(name: str, profile: str, out: Path, log_output: bool = False, **options) -> Executor:
    """The executor called ``name`` (local | ray | slurm), its dependencies checked (SweepError when missing)."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(profile, log_output=log_output, **options)
    if name == "slurm":
        return SlurmExecutor(profile, out, **options)
    raise SweepError(f"unknown executor {name!r}; choose one of: local, ray, slurm")
