"""pcocc-testcluster: bring the real multi-node test cluster up and down.

    pcocc-testcluster up [--nodes N] [--base DIR] [--ovs/--no-ovs] [--json]
    eval "$(pcocc-testcluster env)"; srun -N2 hostname
    pcocc-testcluster down
"""

import json
import shlex
import sys

import click

from pcocc.errors import ExitStatus, NotFoundError, PcoccError
from pcocc.testcluster.cluster import DEFAULT_BASE, TestCluster

base_option = click.option(
    "--base", default=DEFAULT_BASE, show_default=True, type=click.Path(file_okay=False),
    help="Directory holding the cluster's state, configs, logs and sockets; names and addresses derive from it.",
)


def _log(message):
    click.echo(message, err=True)


@click.group()
def program():
    """A real multi-node SLURM + etcd + Open vSwitch test cluster on this machine (root only)."""


@program.command()
@base_option
@click.option("--nodes", default=2, show_default=True, type=click.IntRange(1, 200), help="Number of compute nodes.")
@click.option("--ovs/--no-ovs", default=True, show_default=True, help="One Open vSwitch per node.")
@click.option("--pcocc", "pcocc_path", type=click.Path(dir_okay=False), help="The pcocc the SPANK plugin runs.")
@click.option("--no-install", is_flag=True, help="Do not apt-get install missing packages.")
@click.option("--keep-on-failure", is_flag=True, help="Leave a failed cluster in place to look at its logs.")
@click.option("--json", "as_json", is_flag=True, help="Print the cluster's status as JSON.")
def up(base, nodes, ovs, pcocc_path, no_install, keep_on_failure, as_json):
    """Install what is missing, start the cluster and wait until every node is idle."""
    tc = TestCluster(base, nodes=nodes, ovs=ovs, pcocc=pcocc_path, install=not no_install, log=_log)
    try:
        tc.up()
    except BaseException:
        if not keep_on_failure and tc.base.joinpath("state.json").exists():
            _log("up failed: taking down what was started (--keep-on-failure keeps it)")
            tc.down()
        raise
    if as_json:
        click.echo(json.dumps({**tc.status(), "timings": tc.timings}, indent=2))
    else:
        _log(f"test cluster {tc.id} up in {tc.timings['ready']:.2f} s: nodes {', '.join(tc.node_names)}")
        _log(f'eval "$(pcocc-testcluster env --base {shlex.quote(str(tc.base))})"')


@program.command()
@base_option
def down(base):
    """Stop and delete everything the cluster in BASE made (safe to repeat)."""
    tc = TestCluster(base, log=_log)
    if not tc.down():
        _log(f"nothing recorded in {tc.base}: nothing to do")


@program.command()
@base_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status(base, as_json):
    """Show the nodes, processes and network objects of the cluster."""
    st = TestCluster(base).status()
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    if "processes" not in st:
        click.echo(f"no test cluster in {st['base']}")
        return
    click.echo(f"test cluster {st['id']} in {st['base']}: {'up' if st['up'] else 'not ready'}")
    for node, state in sorted(st["nodes"].items()):
        click.echo(f"  {node:10} {state}")
    for name, p in st["processes"].items():
        click.echo(f"  {name:22} pid {p['pid']!s:8} {'running' if p['alive'] else 'stopped'}")


@program.command()
@base_option
def env(base):
    """Print `export` lines for the cluster's clients: eval "$(pcocc-testcluster env)"."""
    tc = TestCluster(base)
    if not tc.base.joinpath("state.json").exists():
        raise NotFoundError(f"no test cluster in {tc.base}", hint="start one with `pcocc-testcluster up`")
    for key, value in tc.env.items():
        click.echo(f"export {key}={shlex.quote(value)}")


def main(argv=None):
    """The one error boundary: known errors become one message and an exit status."""
    try:
        status = program.main(args=argv, prog_name="pcocc-testcluster", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(ExitStatus.INTERRUPTED)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(ExitStatus.INTERRUPTED)
    except PcoccError as e:
        for i, line in enumerate(e.lines()):
            click.echo(("pcocc-testcluster: error: " if i == 0 else "  ") + line, err=True)
        if e.hint:
            click.echo(e.hint, err=True)
        sys.exit(e.status)
    sys.exit(status or ExitStatus.OK)


if __name__ == "__main__":
    main()
