"""pcocc image ...: list, show, import, export, copy, delete, resize, verify, build, repo."""

import os

import click

from pcocc.cli.core import pass_app
from pcocc.cli.progress import progress_bar
from pcocc.cli.render import dump_json, table
from pcocc.errors import PcoccError


def _store(app):
    return app.ctx.images()


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@click.group()
def image():
    """Manage VM images and repositories.

    Images are named [REPO:]NAME[@REVISION]; without a revision, the latest.
    """


@image.command("list")
@click.option("-R", "--repo", help="Only this repository.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.argument("regex", required=False)
@pass_app
def list_(app, repo, regex, as_json):
    """List images (latest revision of each), optionally matching REGEX.

    Repositories of the original pcocc (layout version 2) are listed too; one
    that cannot be read is named on stderr and the others are listed.
    """
    problems = []
    revs = _store(app).list(repo, regex, problems=problems)
    for exc in problems:
        app.warn(exc.message + (f". {exc.hint}" if exc.hint else ""))
    if as_json:
        return dump_json(app, [r.to_json() for r in revs])
    if not revs:
        app.info("No images.")
        return
    table(app, ["NAME", "REPO", "REVISION", "SIZE", "OWNER", "DATE"],
          [[r.name, r.repo.name, r.revision, _size(r.size), r.owner, r.timestamp] for r in revs])


@image.command()
@click.argument("image_uri", metavar="IMAGE")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_app
def show(app, image_uri, as_json):
    """Show an image and its revisions."""
    rev = _store(app).find(image_uri)
    revs = rev.repo.revisions(rev.name)
    if as_json:
        return dump_json(app, {**rev.to_json(), "revisions": [r.to_json() for r in revs]})
    fmt = " (the original pcocc's layout)" if rev.repo.layout != "pcocc" else ""
    app.out(f"Image {rev.name} in repository {rev.repo.name} ({rev.repo.path}){fmt}")
    app.out(f"  latest: {revs[-1].uri}, {len(rev.layers)} layer(s), virtual size {_size(rev.size)}")
    if rev.boot.get("kernel"):
        app.out(f"  boots its own kernel: {rev.boot.get('append', '')}")
    app.out("")
    table(app, ["REVISION", "LAYERS", "SIZE", "ON DISK", "OWNER", "DATE"],
          [[r.revision, len(r.layers), _size(r.size), _size(r.disk_usage()), r.owner, r.timestamp] for r in revs])


@image.command("import")
@click.option("-t", "--fmt", help="Format of SOURCE (raw, qcow2, qed, vdi, vpc, vmdk); default: detected.")
@click.option("--no-boot-files", is_flag=True, help="Ignore the boot files 'image export' wrote beside SOURCE.")
@click.argument("source", type=click.Path(dir_okay=False))
@click.argument("dest")
@pass_app
def import_(app, fmt, no_boot_files, source, dest):
    """Import the disk image file SOURCE as image DEST (its first revision).

    If SOURCE.boot.json is there (written by 'image export' for images that boot
    their own kernel), the kernel, initrd and command line it names are imported too.
    """
    with progress_bar(app, f"importing {source}") as bar:
        rev = _store(app).import_(source, dest, fmt, bar, boot_files=not no_boot_files)
    app.info(f"imported {rev.uri}" + (" with its boot files (kernel, initrd, command line)" if rev.boot.get("kernel") else ""))
    problem = rev.boot_problem()
    if problem:
        app.warn(f"{problem}: its VMs need a template that sets 'kernel'")


@image.command()
@click.option("-t", "--fmt", help="Format of DEST (raw, qcow2, ...); default: from its extension, else qcow2.")
@click.argument("source")
@click.argument("dest", type=click.Path(dir_okay=False))
@pass_app
def export(app, fmt, source, dest):
    """Export image SOURCE to the file DEST, as a single flat image.

    An image that boots its own kernel (such as built images) also gets
    DEST.kernel, DEST.initrd and DEST.boot.json beside DEST: keep them with it,
    'image import DEST' reads them back.
    """
    with progress_bar(app, f"exporting {source}") as bar:
        rev, written = _store(app).export(source, dest, fmt, bar)
    app.info(f"exported {rev.uri} to {dest}" + (f" (boot files beside it: {', '.join(os.path.basename(p) for p in written[:-1])})" if len(written) > 1 else ""))


@image.command()
@click.argument("source")
@click.argument("dest")
@pass_app
def copy(app, source, dest):
    """Copy image SOURCE to a new image DEST (e.g. to another repository)."""
    with progress_bar(app, f"copying {source}") as bar:
        rev = _store(app).copy(source, dest, bar)
    app.info(f"copied to {rev.uri}")


@image.command()
@click.argument("image_uri", metavar="IMAGE")
@pass_app
def delete(app, image_uri):
    """Delete IMAGE, or only one revision with IMAGE@REV. Space is freed by 'repo gc'."""
    for rev in _store(app).delete(image_uri):
        app.info(f"deleted {rev.uri}")


@image.command()
@click.argument("image_uri", metavar="IMAGE")
@click.argument("size")
@pass_app
def resize(app, image_uri, size):
    """Grow IMAGE to SIZE (e.g. 20G) as a new revision."""
    from pcocc.images.qemuimg import parse_size

    rev = _store(app).resize(image_uri, parse_size(size))
    app.info(f"resized to {_size(rev.size)}: {rev.uri}")


@image.command()
@click.option("-R", "--repo", help="Only this repository.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_app
def verify(app, repo, as_json):
    """Check every blob's hash and every layer chain; list what 'repo gc' would remove."""
    store = _store(app)
    problems, leftovers = [], []
    for r in [store.repo(repo)] if repo else store.repos:
        if r.exists():
            problems += r.verify()
            leftovers += [f"{r.name}: {x}" for x in r.leftovers()]
            try:
                mode = os.stat(r.path).st_mode & 0o777
            except OSError:
                mode = 0
            if r.private and mode & 0o077:
                app.warn(f"repository '{r.name}' ({r.path}) is open to other users (mode {mode:o}): 'chmod 700 {r.path}' makes it private")
    if as_json:
        dump_json(app, {"ok": not problems, "problems": problems, "leftovers": leftovers})
    else:
        for p in problems:
            app.out(p)
        if leftovers:
            app.info(f"{len(leftovers)} unused file(s) that 'pcocc image repo gc' removes")
    if problems:
        raise PcoccError(f"{len(problems)} problem(s) found")
    if not as_json:
        app.info("all images verified")


@image.command()
@click.argument("recipe", type=click.Choice(["tiny", "debian"]))
@click.argument("dest")
@pass_app
def build(app, recipe, dest):
    """Build a guest image from Debian packages (no download from elsewhere) as image DEST.

    tiny: a small busybox-based guest with qemu-guest-agent and ssh that boots in seconds;
    debian: a minimal Debian with systemd and real cloud-init.
    """
    from pcocc.images.build import build_image

    built = build_image(recipe, cache_dir=os.path.join(app.env.cache_dir, "images"), log=app.info)
    # the uncompressed kernel boots seconds faster under TCG (no decompression in the guest)
    boot = {"kernel": str(built.vmlinux or built.kernel), "initrd": str(built.initrd), "append": built.append}
    rev = _store(app).import_(str(built.disk), dest, "qcow2", description=f"pcocc {recipe} image", boot=boot)
    app.info(f"built {rev.uri}")


@image.group()
def repo():
    """Image repositories."""


@repo.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_app
def repo_list(app, as_json):
    """List the configured repositories, in search order.

    FORMAT is pcocc's own layout or 'pcocc-0.7' (the original pcocc's layout
    version 2, read and written in place). IMAGES is '-' for a repository that
    cannot be read (the reason goes to stderr).
    """
    rows = []
    for r in _store(app).repos:
        try:
            count = len(r.image_names())
        except PcoccError as exc:
            app.warn(exc.message + (f". {exc.hint}" if exc.hint else ""))
            count = None
        rows.append({"name": r.name, "path": r.path, "scope": r.scope, "format": r.layout, "writable": r.writable(), "images": count})
    if as_json:
        return dump_json(app, rows)
    table(app, ["NAME", "PATH", "SCOPE", "FORMAT", "WRITABLE", "IMAGES"],
          [[r["name"], r["path"], r["scope"], r["format"], "yes" if r["writable"] else "no", "-" if r["images"] is None else r["images"]] for r in rows])


@repo.command("gc")
@click.argument("name", required=False)
@pass_app
def repo_gc(app, name):
    """Remove blobs no image uses, and leftovers of interrupted writes.

    In a repository of the original pcocc, an unused blob or work file younger
    than a day stays: the original writes its data before its metadata, without
    a lock, so it may be a write of the original in flight.
    """
    r = _store(app).repo(name)
    files, freed = r.gc()
    app.info(f"{r.name}: removed {files} file(s), {_size(freed)} freed")
