"""One command checks everything: `nox` runs tests, lint and types."""

import nox

nox.options.sessions = ["tests", "lint", "types"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "ckpt_async", "tests", "benchmarks")


@nox.session
def types(session: nox.Session) -> None:
    session.install("-e", ".", "mypy")
    session.run("mypy", "ckpt_async")


@nox.session
def docs(session: nox.Session) -> None:
    """Builds the documentation site (mkdocs, strict: broken links fail) into build/site and
    runs the docs example scripts. `python benchmarks/chart.py` redraws docs/img/performance.svg
    from a benchmark run's results."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs)
    session.run("python", "docs/examples/api_overview.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side benchmark against Orbax, NumPy and safetensors (`-- --quick`)."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(venv_params=["--system-site-packages"])
def bench_device(session: nox.Session) -> None:
    """A save of arrays on an accelerator (GPU) against Orbax, with the device-to-host
    overlap and the machine's limits (`-- --large-mib 4096 --repeats 3`). The session sees
    the system's packages, so that the jax with the accelerator's plugin installed there is
    the one used (pip leaves what is already there)."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/device_overlap.py", *session.posargs)


@nox.session
def bench_busy(session: nox.Session) -> None:
    """A save the trainer waits for while other processes keep every core busy, against
    Orbax (`-- --repeats 3`)."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/busy_machine.py", *session.posargs)


@nox.session
def bench_objstore(session: nox.Session) -> None:
    """Save and restore on moto's S3 server on 127.0.0.1, with the requests each makes
    (`-- --repeats 3`; `-- --store gcs --latency-ms 20`: fake-gcs-server, each request held
    20 ms)."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/object_store.py", *session.posargs)
