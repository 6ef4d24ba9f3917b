"""Build guest images from recipes: a kernel, a stage-1 initramfs and a qcow2 root disk.

A recipe is a directory (``recipes/<name>/`` in this package, or any directory)
holding ``recipe.yaml`` and ``customize.sh``.  build_image():

1. takes Debian's generic kernel (the package ``linux-image-amd64`` depends on;
   not the cloud kernel, which has no 9p) with ``apt-get download`` and
   ``dpkg-deb -x``;
2. builds a busybox initramfs (``recipes/_common/stage1-init``) that loads the
   recipe's modules, dependencies first, and switch_roots into the root disk;
3. debootstraps the recipe's Debian suite, runs ``customize.sh`` over the tree,
   makes an ext4 image of it with ``mkfs.ext4 -d`` (no loop device, no mount)
   and converts it to qcow2.

Images are cached in ``cache_dir``, one directory per build key: the sha256 of the
recipe's files, the shared ``_common`` files, the kernel package and version and
the busybox-static version.  A build writes into a temporary directory of
cache_dir and renames it into place; each entry has a manifest with the sha256 of
its files, checked at every cache hit (a corrupted entry is rebuilt).  The cached
files are read-only: boot them through a qcow2 overlay.  Building needs root
(debootstrap, chroot); missing host packages are installed with apt-get.
"""

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import yaml

from pcocc.errors import CommandError, ConfigError, ExitStatus, NotFoundError, PcoccError, PermissionDenied
from pcocc.runner import run

BUILD_FORMAT = 1  # bump when the build steps change what they produce
RECIPES_DIR = Path(__file__).with_name("recipes")
COMMON_DIR = RECIPES_DIR / "_common"
HOST_PACKAGES = ("debootstrap", "busybox-static", "e2fsprogs", "cpio", "kmod", "qemu-utils", "genisoimage")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
STATIC_BUSYBOX = Path("/bin/busybox")  # from busybox-static
MANIFEST = "manifest.json"
FILES = {"disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img", "vmlinux": "vmlinux"}
OPTIONAL_FILES = {"vmlinux"}
EXPORT_SUFFIX = {"disk": ".qcow2", "kernel": ".vmlinuz", "initrd": ".initrd", "vmlinux": ".vmlinux"}


class ImageBuildError(PcoccError):
    """A guest image could not be built."""

    status = ExitStatus.EXTERNAL


@dataclasses.dataclass(frozen=True)
class BuiltImage:
    """A built guest image: boot ``kernel`` + ``initrd`` with ``append``, over an overlay of ``disk``."""

    recipe: str
    key: str
    disk: Path
    kernel: Path
    initrd: Path
    append: str
    kernel_version: str = ""
    # the same kernel uncompressed (an ELF with a PVH entry point, bootable by qemu's
    # -kernel): it skips the in-guest decompression, seconds under TCG.  None if the
    # kernel has no PVH entry or an unknown compression.
    vmlinux: Path | None = None
    cached: bool = False  # True when build_image() found it in the cache


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    suite: str
    mirror: str
    variant: str
    include: tuple
    kernel: str
    modules: tuple
    size: int
    hostname: str
    append: str
    description: str = ""
    digest: tuple = ()  # its files (and the common ones) when it was loaded: recipe_digest


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pcocc" / "images"


def list_recipes():
    """Names of the recipes shipped with pcocc."""
    return sorted(p.name for p in RECIPES_DIR.iterdir() if (p / "recipe.yaml").is_file() and not p.name.startswith("_"))


def load_recipe(recipe):
    """A Recipe from a shipped recipe name, a recipe directory, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    path = Path(recipe)
    if not (path / "recipe.yaml").is_file():
        if str(recipe).startswith("_") or not (RECIPES_DIR / str(recipe) / "recipe.yaml").is_file():
            raise NotFoundError(f"no image recipe named {recipe!r}", hint=f"known recipes: {', '.join(list_recipes())}")
        path = RECIPES_DIR / str(recipe)
    conf = path / "recipe.yaml"
    try:
        data = yaml.safe_load(conf.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError([f"{conf}: {e}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{conf}: expected a mapping"])
    missing = [k for k in ("suite", "mirror", "kernel", "append") if not data.get(k)]
    if missing:
        raise ConfigError([f"{conf}: missing key {k}" for k in missing])
    if not (path / "customize.sh").is_file():
        raise ConfigError([f"{path}: no customize.sh"])
    try:
        size = _parse_size(data.get("size", "1G"))
    except ValueError:
        raise ConfigError([f"{conf}: size: expected a size like 1G, got {data.get('size')!r}"]) from None
    digest = recipe_digest(path.resolve())
    if yaml.safe_load(conf.read_text()) != data:  # changed while we read it: the digest may be of another text
        raise ImageBuildError(f"recipe {path} changed while it was read: try again")
    return Recipe(
        digest=digest,
        name=path.resolve().name,
        path=path.resolve(),
        suite=str(data["suite"]),
        mirror=str(data["mirror"]),
        variant=str(data.get("variant", "")),
        include=tuple(str(p) for p in data.get("include") or ()),
        kernel=str(data["kernel"]),
        modules=tuple(str(m) for m in data.get("modules") or ()),
        size=size,
        hostname=str(data.get("hostname", "pcocc")),
        append=str(data["append"]),
        description=str(data.get("description", "")),
    )


def build_image(recipe, out_dir=None, cache_dir=None, log=print):
    """Build the image of recipe, or take it from cache_dir; return a BuiltImage.

    With out_dir, the files are also linked (or copied) there as <recipe>.qcow2,
    <recipe>.vmlinuz, <recipe>.vmlinux and <recipe>.initrd, and the BuiltImage
    points to them.  Progress goes to log (a callable taking one line).  Failures
    raise PcoccError subclasses (ImageBuildError, CommandError, ConfigError...).
    """
    recipe = load_recipe(recipe)
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        return _build_image(recipe, out_dir, cache_dir, log)
    except OSError as e:
        raise ImageBuildError(f"{recipe.name} image: {e}") from None


def _build_image(recipe, out_dir, cache_dir, log):
    started = time.monotonic()
    cache_dir.mkdir(parents=True, exist_ok=True)
    ensure_host_packages(log=log)
    kpkg, kver = _kernel_package(recipe.kernel, log)
    key = build_key(recipe, kpkg, kver)
    entry = cache_dir / f"{recipe.name}-{key[:16]}"
    with _locked(cache_dir / f".{recipe.name}.lock", log):
        manifest, why = verify_cache_entry(entry, key)
        cached = manifest is not None
        if cached:
            log(f"[{recipe.name}] cache hit: {entry} ({time.monotonic() - started:.1f} s)")
        else:
            if entry.exists():
                log(f"[{recipe.name}] cache entry {entry.name} is unusable ({why}): rebuilding it")
                _remove_tree(entry)
            for stale in cache_dir.glob(f".build-{recipe.name}-*"):
                log(f"[{recipe.name}] removing the leftovers of an interrupted build: {stale.name}")
                _remove_tree(stale)
            manifest = _build(recipe, key, kpkg, kver, cache_dir, entry, log)
            if recipe_digest(recipe.path) != recipe.digest:  # its files changed during the build: not that key's image
                _remove_tree(entry)
                raise ImageBuildError(f"recipe {recipe.name} changed during its build: build again")
    image = BuiltImage(
        recipe=recipe.name,
        key=key,
        disk=entry / FILES["disk"],
        kernel=entry / FILES["kernel"],
        initrd=entry / FILES["initrd"],
        vmlinux=entry / FILES["vmlinux"] if FILES["vmlinux"] in manifest["sha256"] else None,
        append=manifest["append"],
        kernel_version=manifest["kernel_version"],
        cached=cached,
    )
    return _export(image, Path(out_dir)) if out_dir else image


def recipe_digest(path):
    """The recipe directory `path`'s files and the common ones, as a tuple of (name, sha256 hex)."""
    out = []
    for prefix, root in (("recipe", Path(path)), ("common", COMMON_DIR)):
        for p in sorted(root.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                out.append((f"{prefix}/{p.relative_to(root).as_posix()}", hashlib.sha256(p.read_bytes()).hexdigest()))
    return tuple(out)


def build_key(recipe, kernel_package, kernel_version):
    """The cache key of a recipe: what its image is built from (its files as they were when it
    was loaded: a recipe edited during a build must not name the image of its former text)."""
    h = hashlib.sha256()
    h.update(f"pcocc-image-format {BUILD_FORMAT}\n".encode())
    for name, digest in recipe.digest or recipe_digest(recipe.path):
        h.update(f"{name}\0".encode())
        h.update(bytes.fromhex(digest))
    h.update(f"kernel {kernel_package}={kernel_version}\n".encode())
    h.update(f"busybox-static={_package_version('busybox-static')}\n".encode())
    return h.hexdigest()


# ---- host packages -----------------------------------------------------------------


def ensure_host_packages(packages=HOST_PACKAGES, log=print):
    """Install the packages among packages that are not installed (apt-get, no daemons started)."""
    missing = [p for p in packages if _package_status(p) != "installed"]
    if not missing:
        return
    if os.geteuid() != 0:
        raise PermissionDenied(f"missing host packages: {' '.join(missing)}", hint="install them as root with apt-get")
    log(f"installing host packages: {' '.join(missing)}")
    with policy_rc_d():
        _apt_update(log)
        run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=_apt_env(), timeout=1800)


@contextlib.contextmanager
def policy_rc_d(path=POLICY_RC_D):
    """An "exit 101" policy-rc.d during package installs, so that no daemon starts."""
    created = False
    if not path.exists() and not path.is_symlink():
        path.write_text("#!/bin/sh\n# written by pcocc for the time of a package install\nexit 101\n")
        path.chmod(0o755)
        created = True
    try:
        yield
    finally:
        if created:
            path.unlink(missing_ok=True)


def _apt_env():
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _apt_update(log):
    log("apt-get update")
    run(["apt-get", "update", "-q"], env=_apt_env(), timeout=600)


def _package_status(package):
    proc = run(["dpkg-query", "-W", "-f=${db:Status-Status}", package], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _package_version(package):
    proc = run(["dpkg-query", "-W", "-f=${Version}", package], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _kernel_package(meta, log):
    """The versioned kernel package meta depends on, and its version.

    Debian's meta package pins it ("Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)"):
    one apt-cache call, about a second where apt keeps no binary cache (Docker images).
    """
    for attempt in (1, 2):
        show = run(["apt-cache", "show", "--no-all-versions", meta], check=False).stdout
        m = re.search(r"^Depends:.*?\b(linux-image-\d\S*)(?:\s*\(=\s*([^)\s]+)\))?", show, re.M)
        if m and m.group(2):
            return m.group(1), m.group(2)
        if m:
            pkg = run(["apt-cache", "show", "--no-all-versions", m.group(1)], check=False).stdout
            v = re.search(r"^Version:\s*(\S+)", pkg, re.M)
            if v:
                return m.group(1), v.group(1)
        if attempt == 1:
            _apt_update(log)
    raise ImageBuildError(
        f"apt-cache cannot resolve the kernel package {meta} depends on",
        hint="check the Debian sources in /etc/apt/sources.list and run apt-get update",
    )


# ---- the cache ---------------------------------------------------------------------


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_cache_entry(entry, key):
    """(manifest, "") for a sound cache entry, else (None, why)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return None, "no manifest"
    except (OSError, ValueError) as e:
        return None, f"unreadable manifest: {e}"
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return None, "the manifest is for another key"
    sums = manifest.get("sha256")
    if not isinstance(sums, dict) or any(FILES[r] not in sums for r in FILES if r not in OPTIONAL_FILES):
        return None, "the manifest lacks files"
    for name, digest in sums.items():
        path = entry / name
        if not path.is_file():
            return None, f"{name} is missing"
        if _sha256(path) != digest:
            return None, f"{name} does not match the sha256 of its manifest"
    return manifest, ""


@contextlib.contextmanager
def _locked(path, log):
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build ({path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _export(image, out_dir):
    """Link (or copy) the image's files into out_dir; the BuiltImage pointing to them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for attr, suffix in EXPORT_SUFFIX.items():
        src, dst = getattr(image, attr), out_dir / f"{image.recipe}{suffix}"
        if src is None:
            continue
        tmp = out_dir / f".{dst.name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        paths[attr] = dst
    return dataclasses.replace(image, **paths)


def _mounts_under(path):
    prefix = str(Path(path).resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path):
    """rm -rf path, after unmounting whatever an interrupted debootstrap left mounted in it."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    for mnt in _mounts_under(path):
        run(["umount", "-l", mnt], check=False)
    left = _mounts_under(path)
    if left:
        raise ImageBuildError(f"cannot remove {path}: {left[0]} is still mounted", hint="unmount it, then retry")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# ---- the build -----------------------------------------------------------------------


def _build(recipe, key, kpkg, kver, cache_dir, entry, log):
    if os.geteuid() != 0:
        raise PermissionDenied(f"building the {recipe.name} image needs root (debootstrap, chroot)", hint="run it as root once: the image is cached")
    started = time.monotonic()

    def step(msg):
        log(f"[{recipe.name} {time.monotonic() - started:5.1f}s] {msg}")

    tmp = Path(tempfile.mkdtemp(prefix=f".build-{recipe.name}-", dir=cache_dir))
    try:
        work, out = tmp / "work", tmp / "out"
        work.mkdir()
        out.mkdir()
        step(f"building {recipe.name} (key {key[:16]}) in {tmp}")
        kdir, kernel_version = _fetch_kernel(kpkg, work)
        shutil.copyfile(kdir / "boot" / f"vmlinuz-{kernel_version}", out / FILES["kernel"])
        pvh = _extract_vmlinux(kdir, kernel_version, out / FILES["vmlinux"])
        step(f"kernel {kpkg} {kver} ({kernel_version}) extracted{', with a PVH vmlinux' if pvh else ''}")
        moddir = kdir / "lib" / "modules" / kernel_version
        modules = _resolve_modules(kdir, kernel_version, recipe.modules)
        _make_initramfs(moddir, modules, work, out / FILES["initrd"])
        step(f"initramfs built with {len(modules)} modules")
        rootfs = work / "rootfs"
        step(f"debootstrap {recipe.suite} ({recipe.variant or 'default'} + {', '.join(recipe.include) or 'nothing'})")
        _debootstrap(recipe, rootfs)
        step("customize.sh")
        run(
            ["sh", recipe.path / "customize.sh"],
            env={
                **os.environ,
                "ROOTFS": str(rootfs),
                "RECIPE_DIR": str(recipe.path),
                "COMMON_DIR": str(COMMON_DIR),
                "KERNEL_DIR": str(kdir),
                "KERNEL_VERSION": kernel_version,
                "IMAGE_HOSTNAME": recipe.hostname,
            },
            timeout=1800,
        )
        step("making the ext4 file system and the qcow2 disk")
        raw = work / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(recipe.size)
        run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", rootfs, "-E", "root_owner=0:0", raw], timeout=600)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out / FILES["disk"]], timeout=600)
        _remove_tree(work)
        manifest = {
            "format": BUILD_FORMAT,
            "recipe": recipe.name,
            "key": key,
            "kernel_package": kpkg,
            "kernel_package_version": kver,
            "kernel_version": kernel_version,
            "modules": [Path(m).name for m in modules],
            "append": recipe.append,
            "disk_virtual_size": recipe.size,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started, 1),
            "sha256": {name: _sha256(out / name) for name in FILES.values() if (out / name).exists()},
        }
        for name in manifest["sha256"]:
            (out / name).chmod(0o444)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(out, entry)
        size = (entry / FILES["disk"]).stat().st_size
        step(f"done: {entry} (disk {size / 2**20:.0f} MiB)")
        return manifest
    except OSError as e:
        raise ImageBuildError(f"building the {recipe.name} image failed: {e}") from None
    finally:
        _remove_tree(tmp)


def _fetch_kernel(package, work):
    """Download and unpack the kernel package; (unpacked dir, kernel version)."""
    debs = work / "debs"
    debs.mkdir()
    run(["apt-get", "download", package], cwd=debs, timeout=900)
    deb = next(debs.glob(f"{package}_*.deb"), None)
    if deb is None:
        raise ImageBuildError(f"apt-get download {package} left no .deb")
    kdir = work / "kernel"
    run(["dpkg-deb", "-x", deb, kdir], timeout=600)
    deb.unlink()
    versions = [p.name for p in (kdir / "lib" / "modules").iterdir()]
    if len(versions) != 1 or not (kdir / "boot" / f"vmlinuz-{versions[0]}").is_file():
        raise ImageBuildError(f"{package} holds no single kernel with its modules (found {versions})")
    return kdir, versions[0]


def _extract_vmlinux(kdir, version, dest):
    """Uncompress the bzImage's payload to dest if the kernel has a PVH entry; True if done."""
    config = kdir / "boot" / f"config-{version}"
    if not config.is_file() or "\nCONFIG_PVH=y\n" not in config.read_text(errors="replace"):
        return False
    data = (kdir / "boot" / f"vmlinuz-{version}").read_bytes()
    for magic, decompressor in ((b"\xfd7zXZ\x00", lzma.LZMADecompressor), (b"\x1f\x8b\x08", lambda: zlib.decompressobj(31))):
        start = data.find(magic)
        if start < 0:
            continue
        try:
            elf = decompressor().decompress(data[start:])
        except (lzma.LZMAError, zlib.error):
            continue
        if elf[:4] == b"\x7fELF":
            dest.write_bytes(elf)
            return True
    return False


def _modname(path):
    return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", Path(path).name).replace("-", "_")


def _resolve_modules(kdir, version, wanted):
    """The module files (relative to the modules dir) to load for wanted, dependencies first.

    Uses the modules.dep, modules.softdep and modules.alias that depmod makes; a
    module built into the kernel is skipped; a soft dependency given as an alias
    (ext4: crypto-crc32c) takes one module, the generic one first.
    """
    run(["depmod", "-b", kdir, version], timeout=300)
    moddir = kdir / "lib" / "modules" / version
    deps = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[_modname(path)] = (path, [_modname(d) for d in rest.split()])
    builtin = {_modname(line) for line in (moddir / "modules.builtin").read_text().split()}
    softdeps = {}
    for line in (moddir / "modules.softdep").read_text().splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "softdep":
            mode = None
            for w in words[2:]:
                if w in ("pre:", "post:"):
                    mode = w
                elif mode == "pre:":
                    softdeps.setdefault(_modname(words[1]), []).append(w)
    aliases = {}
    for line in (moddir / "modules.alias").read_text().splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias":
            aliases.setdefault(words[1], []).append(_modname(words[2]))

    order, seen = [], set()

    def add(name, required):
        mod = _modname(name)
        if mod in seen or mod in builtin:
            return
        if mod not in deps:
            targets = sorted(aliases.get(name, ()), key=lambda m: ("generic" not in m, m))
            if targets:
                add(targets[0], required)
            elif required:
                raise ImageBuildError(f"kernel {version} has no module {name}", hint="fix the modules list of the recipe")
            return
        seen.add(mod)
        for pre in softdeps.get(mod, ()):
            add(pre, False)
        for dep in deps[mod][1]:
            add(dep, True)
        order.append(deps[mod][0])

    for name in wanted:
        add(name, True)
    return order


def _make_initramfs(moddir, modules, work, out):
    """A gzipped newc cpio: static busybox, the stage-1 init, the modules and their load order."""
    root = work / "initramfs"
    for d in ("bin", "etc", "lib/modules"):
        (root / d).mkdir(parents=True)
    if not STATIC_BUSYBOX.is_file():
        raise ImageBuildError(f"{STATIC_BUSYBOX} is missing", hint="apt-get install busybox-static")
    shutil.copyfile(STATIC_BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    shutil.copyfile(COMMON_DIR / "stage1-init", root / "init")
    (root / "init").chmod(0o755)
    for rel in modules:
        shutil.copyfile(moddir / rel, root / "lib" / "modules" / Path(rel).name)
    (root / "etc" / "modules.order").write_text("".join(Path(rel).name + "\n" for rel in modules))
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    archive = work / "initramfs.cpio"
    run(
        ["cpio", "-o", "-H", "newc", "--reproducible", "--quiet", "--force-local", "-F", archive],
        input="".join(n + "\n" for n in names),
        cwd=root,
        timeout=300,
    )
    with open(archive, "rb") as src, open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as dst:
        shutil.copyfileobj(src, dst)


def _debootstrap(recipe, rootfs):
    argv = ["debootstrap"]
    if recipe.variant:
        argv.append(f"--variant={recipe.variant}")
    if recipe.include:
        argv.append("--include=" + ",".join(recipe.include))
    argv += [recipe.suite, rootfs, recipe.mirror]
    try:
        run(argv, env=_apt_env(), timeout=3600)
    except CommandError as e:
        logfile = rootfs / "debootstrap" / "debootstrap.log"
        tail = logfile.read_text(errors="replace").splitlines()[-5:] if logfile.is_file() else []
        detail = e.stderr.strip().splitlines()[-3:] + tail
        raise ImageBuildError(
            f"debootstrap {recipe.suite} from {recipe.mirror} failed ({e.returncode})" + "".join(f"\n  {line}" for line in detail)
        ) from None


def _parse_size(value):
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", str(value), re.I)
    if not m:
        raise ValueError(value)
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
