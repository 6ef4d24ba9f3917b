"""The qemu command line and the topology, from templates (no qemu run here)."""

import os

import pytest

from pcocc.hypervisor import topology
from pcocc.hypervisor.qemu import VMConfig, command_line
from pcocc.templates import SETTINGS


def settings(**over):
    values = {k: s.default for k, s in SETTINGS.items()}
    values.update(over)
    return values


def cfg(tmp_path, accel="tcg", cores=(0,), mem=256, **over):
    return VMConfig(name="vm0", rundir=str(tmp_path), settings=settings(**over), accel=accel,
                    topology=topology.plan(cores, mem, sysfs=str(tmp_path / "nosys")), disk="/d/disk.qcow2", seed="/d/seed.iso",
                    boot=("/k/vmlinux", "/k/initrd", "root=/dev/vda"))


def arg_after(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_defaults(tmp_path):
    argv = command_line(cfg(tmp_path))
    assert argv[0] == "qemu-system-x86_64" and "-S" in argv  # started paused, for pinning
    assert arg_after(argv, "-machine") == ["type=pc,accel=tcg"]
    assert "-cpu" not in argv  # TCG: qemu's own model, not the host's
    assert arg_after(argv, "-m") == ["256M"] and arg_after(argv, "-smp")[0].startswith("1,")
    assert "file=/d/disk.qcow2,if=none,id=disk0,cache=unsafe,format=qcow2" in argv
    assert "virtio-blk-pci,drive=disk0,bootindex=1" in argv
    assert arg_after(argv, "-kernel") == ["/k/vmlinux"] and arg_after(argv, "-append") == ["root=/dev/vda"]
    assert any("name=org.qemu.guest_agent.0" in a for a in argv)
    assert any(a.startswith(f"unix:{tmp_path}/qmp.sock") for a in argv)


def test_kvm_uses_host_cpu_and_template_keys(tmp_path):
    argv = command_line(cfg(tmp_path, accel="kvm", cores=(2, 3), mem=1024, **{
        "machine-type": "q35", "disk-model": "ide", "disk-cache": "writeback", "custom-args": ["-rtc", "base=utc"],
        "qemu-bin": "/opt/qemu/bin/qemu", "remote-display": "spice"}))
    assert argv[0] == "/opt/qemu/bin/qemu"
    assert arg_after(argv, "-cpu") == ["host"] and arg_after(argv, "-machine") == ["type=q35,accel=kvm"]
    assert arg_after(argv, "-smp")[0].startswith("2,")
    assert "ide-hd,drive=disk0,bootindex=1" in argv and any("cache=writeback" in a for a in argv)
    assert argv[-2:] == ["-rtc", "base=utc"]
    assert any(a.startswith("unix=on,addr=") for a in arg_after(argv, "-spice"))
    argv = command_line(cfg(tmp_path, **{"cpu-model": "Skylake-Server"}))
    assert arg_after(argv, "-cpu") == ["Skylake-Server"]


def test_template_kernel_wins_and_custom_append(tmp_path):
    argv = command_line(cfg(tmp_path, kernel="/boot/mine", initrd="/boot/mine.img", append="quiet"))
    assert arg_after(argv, "-kernel") == ["/boot/mine"] and arg_after(argv, "-initrd") == ["/boot/mine.img"]
    assert arg_after(argv, "-append") == ["quiet"]
    argv = command_line(cfg(tmp_path, **{"custom-args": ["-append", "console=ttyS1"]}))
    assert arg_after(argv, "-append") == ["console=ttyS1"]  # custom -append replaces ours


def test_mounts_and_persistent_drives(tmp_path):
    c = cfg(tmp_path)
    c.mounts = [("home", "/home/u", False), ("data", "/data", True)]
    c.drives = [("/p/d.raw", "none", "raw")]
    argv = command_line(c)
    assert "local,id=fs_home,path=/home/u,security_model=none" in argv
    assert "local,id=fs_data,path=/data,security_model=none,readonly=on" in argv
    assert "virtio-9p-pci,fsdev=fs_data,mount_tag=data" in argv
    assert "file=/p/d.raw,if=none,id=disk1,cache=none,format=raw" in argv


def fake_sysfs(root, nodes):
    for n, cpus in nodes.items():
        d = root / f"devices/system/node/node{n}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
    return str(root)


def test_numa_one_guest_node_per_host_node_spanned(tmp_path):
    sysfs = fake_sysfs(tmp_path / "sys", {0: "0-3", 1: "4-7"})
    topo = topology.plan([2, 3, 4, 5, 6], 1000, sysfs=sysfs)
    assert topo.numa == ((0, (0, 1)), (1, (2, 3, 4)))
    args = topology.numa_args(topo)
    assert "node,nodeid=0,cpus=0,cpus=1,memdev=mem0" in args and "node,nodeid=1,cpus=2,cpus=3,cpus=4,memdev=mem1" in args
    sizes = [a for a in args if a.startswith("memory-backend-ram")]
    assert sizes == ["memory-backend-ram,id=mem0,size=400M,host-nodes=0,policy=bind", "memory-backend-ram,id=mem1,size=600M,host-nodes=1,policy=bind"]
    assert topology.numa_args(topology.plan([0, 1], 512, sysfs=sysfs)) == []


def test_cpulists():
    assert topology.parse_cpulist("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert topology.format_cpulist([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_slurm_task_slice(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cores, mem = topology.task_slice({"SLURM_CPUS_PER_TASK": "2", "SLURM_LOCALID": "1", "SLURM_MEM_PER_CPU": "300"})
    assert cores == [2, 3] and mem == 600
    cores, mem = topology.task_slice({"SLURM_MEM_PER_NODE": "4000", "SLURM_TASKS_PER_NODE": "4(x2)"})
    assert cores == [0] and mem == 1000


def test_pinning_sets_each_vcpu_thread(monkeypatch):
    calls = {}
    monkeypatch.setattr(os, "sched_setaffinity", lambda tid, cpus: calls.__setitem__(tid, cpus))
    topology.pin_vcpus({0: 101, 1: 102}, topology.plan([6, 7], 256))
    assert calls == {101: {6}, 102: {7}}


@pytest.mark.parametrize("model", ["virtio-scsi"])
def test_scsi_disks(tmp_path, model):
    argv = command_line(cfg(tmp_path, **{"disk-model": model}))
    assert "virtio-scsi-pci,id=scsi0" in argv and "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=1" in argv


def test_emulator_cores_are_kept_for_qemu_threads(monkeypatch, tmp_path):
    topo = topology.plan([4, 5, 6, 7], 512, sysfs=str(tmp_path), emulator_cores=1)
    assert topo.cores == (4, 5, 6) and topo.emulator_cores == (7,) and topo.vcpus == 3
    assert topology.plan([4], 512, sysfs=str(tmp_path), emulator_cores=2).cores == (4,)  # at least one vCPU
    calls = {}
    monkeypatch.setattr(os, "listdir", lambda path: ["900", "901", "902"])
    monkeypatch.setattr(os, "sched_setaffinity", lambda tid, cpus: calls.__setitem__(tid, cpus))
    topology.pin_vcpus({0: 901, 1: 902}, topo, qemu_pid=900)
    assert calls == {900: {7}, 901: {4}, 902: {5}}


def test_tasks_per_node_layouts():
    assert topology.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert topology.expand_tasks_per_node("4") == [4]
    _, mem = topology.task_slice({"SLURM_MEM_PER_NODE": "3000", "SLURM_STEP_TASKS_PER_NODE": "1,3", "SLURM_NODEID": "1"})
    assert mem == 1000


def test_persistent_drive_format_is_never_probed():
    from pcocc.templates import _drive

    assert _drive("/d/data.raw")["format"] == "raw"
    assert _drive("/d/data.qcow2")["format"] == "qcow2"
    assert _drive({"/d/data.img": {"cache": "none", "mmp": True, "backup": None, "format": "qcow2"}})["format"] == "qcow2"


def test_commas_in_paths_cannot_add_qemu_options(tmp_path):
    c = cfg(tmp_path)
    c.mounts = [("data", "/data,readonly=off,x=y", False)]
    argv = command_line(c)
    assert "local,id=fs_data,path=/data,,readonly=off,,x=y,security_model=none" in argv


def test_virtio_fs_is_refused_where_an_unprivileged_virtiofsd_is_not_sound():
    import pytest

    from pcocc.errors import PcoccError
    from pcocc.hypervisor.virtiofs import check_sound

    with pytest.raises(PcoccError, match="refused for root's clusters"):
        check_sound(uid=0, gid=0, groups=[])
    with pytest.raises(PcoccError, match="without supplementary groups"):
        check_sound(uid=1000, gid=1000, groups=[1000, 27])
    check_sound(uid=1000, gid=1000, groups=[1000])  # only their own group: sound
    check_sound(uid=1000, gid=1000, groups=[])
