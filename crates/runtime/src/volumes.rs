//! Local disks (`spec.volumes`, the `local-disk` platform service): each volume is a
//! file of exactly its size in the instance's directory (`volumes/NAME.img`). For a
//! process or a container it holds an ext4 filesystem, so its quota is the
//! filesystem's own end: a write past it fails with "no space left on device",
//! whoever writes. (A directory on the node's filesystem, as local-path-provisioner
//! hands out, has no such end.) A VM gets the file itself, blank, as a virtio disk of
//! that size (its guest makes its own filesystem).
//!
//! For processes and containers the file is mounted (through a loop device) at
//! `volumes/NAME/`: a process finds it as `VERGE_VOLUME_<NAME>`, a container at its
//! `path`. A VM's is never mounted on the node. The file and the mount outlive
//! restarts of the instance and of the agent (the kernel keeps the mount; after a
//! reboot the next start mounts it again); [`release`] unmounts them when the
//! instance leaves the node, before its directory is removed.
//!
//! A volume may grow (before the workload starts again: the file, and for processes
//! and containers the filesystem), never shrink.

use std::path::{Path, PathBuf};
use std::process::Command;

use verge_api::instance::VolumeSpec;
use verge_api::{Form, InstanceSpec};

use crate::{RuntimeError, Workload};

/// The file that holds volume `name` of the instance whose directory is `dir`.
pub fn image(dir: &Path, name: &str) -> PathBuf {
    dir.join("volumes").join(format!("{name}.img"))
}

/// Where volume `name` is mounted on the node (processes and containers).
pub fn mount_point(dir: &Path, name: &str) -> PathBuf {
    dir.join("volumes").join(name)
}

/// Whether the instance's volumes are mounted on the node (not for a VM's).
pub fn mounted_for(spec: &InstanceSpec) -> bool {
    spec.form != Form::Vm
}

fn fail(what: &VolumeSpec, why: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Start {
        what: format!("volume {}", what.name),
        source: std::io::Error::other(why.to_string()),
    }
}

/// Run a tool, its failure an error that quotes what it said.
fn run(v: &VolumeSpec, program: &str, args: &[&str]) -> Result<(), RuntimeError> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        fail(
            v,
            format!("{program}: {e} (local disks need e2fsprogs and util-linux on the node)"),
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(
            v,
            format!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

/// Whether something is mounted at `path` (per this process's mount table).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.display().to_string();
    // Field 5 is the mount point (spaces escaped as \040, which our paths lack).
    table
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Make every volume of `w` ready before it starts: made (formatted) if new, grown if
/// its size went up, refused if it went down; mounted unless it is a VM's. The
/// directory of a volume a process runs in is given to its user.
pub fn prepare(w: &Workload, owner: Option<(u32, u32)>) -> Result<(), RuntimeError> {
    let mount = mounted_for(w.spec());
    for v in &w.spec().volumes {
        let img = image(&w.dir, &v.name);
        let mp = mount_point(&w.dir, &v.name);
        std::fs::create_dir_all(&mp).map_err(|e| w.dir_error(e))?;
        let have = std::fs::metadata(&img).map(|m| m.len()).ok();
        let img_s = img.display().to_string();
        match have {
            None => {
                let f = std::fs::File::create(&img).map_err(|e| w.dir_error(e))?;
                // Sparse: it takes disk as it is written (the reservation is the
                // node's disk accounting, spec.resources.disk).
                f.set_len(v.size.0).map_err(|e| w.dir_error(e))?;
                drop(f);
                // A VM's is a blank disk: its guest makes its own filesystem.
                if !mount {
                    continue;
                }
                if let Err(e) = run(v, "mkfs.ext4", &["-q", "-F", "-m", "0", &img_s]) {
                    let _ = std::fs::remove_file(&img);
                    return Err(e);
                }
            }
            Some(n) if n > v.size.0 => {
                return Err(fail(
                    v,
                    format!(
                        "it holds {} and a volume cannot shrink: give spec.volumes size {} or more",
                        verge_api::Bytes(n),
                        verge_api::Bytes(n)
                    ),
                ));
            }
            Some(n) if n < v.size.0 => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&img)
                    .map_err(|e| w.dir_error(e))?;
                f.set_len(v.size.0).map_err(|e| w.dir_error(e))?;
                drop(f);
                if !mount {
                    // A VM's disk is longer; its guest grows what is on it.
                    continue;
                }
                // Offline (the workload is not running yet; online growth needs
                // an ioctl a container's node may not allow), mounted again below.
                if is_mounted(&mp) {
                    run(v, "umount", &[&mp.display().to_string()])?;
                }
                run(v, "e2fsck", &["-f", "-p", &img_s]).ok();
                run(v, "resize2fs", &[&img_s])?;
            }
            Some(_) => {}
        }
        if mount && !is_mounted(&mp) {
            let mp_s = mp.display().to_string();
            run(
                v,
                "mount",
                &["-o", "loop,nodev,nosuid", "-t", "ext4", &img_s, &mp_s],
            )?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&mp, Some(uid), Some(gid)).map_err(|e| w.dir_error(e))?;
            }
        }
    }
    Ok(())
}

/// Unmount every volume of the instance whose directory is `dir` (it is leaving the
/// node, or its directory is about to be removed): a mounted volume left in a
/// directory that is then removed would have its files deleted through the mount.
pub fn release(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir.join("volumes")) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && is_mounted(&p) {
            let ok = Command::new("umount")
                .arg(&p)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                // Busy (a process still holds it): detach it now, gone when let go.
                let _ = Command::new("umount").arg("-l").arg(&p).status();
            }
        }
    }
}

/// The volumes a container mounts: (its path in the container, the directory on the
/// node).
pub fn container_mounts(w: &Workload) -> Vec<(String, PathBuf)> {
    w.spec()
        .volumes
        .iter()
        .filter_map(|v| Some((v.path.clone()?, mount_point(&w.dir, &v.name))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use verge_api::{Bytes, Instance};

    /// Unmounts whatever the test left mounted, however it ends.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            release(&self.0);
        }
    }

    fn workload(dir: &Path, size: u64) -> Workload {
        let mut spec = InstanceSpec {
            form: Form::Process,
            ..Default::default()
        };
        spec.volumes = vec![VolumeSpec {
            name: "data".into(),
            size: Bytes(size),
            path: None,
        }];
        Workload {
            instance: Instance::new("vol", spec),
            dir: dir.to_path_buf(),
            cgroup: None,
            run_id: None,
        }
    }

    /// Write `mib` MiB to `path`; the error if it fails.
    fn fill(path: &Path, mib: usize) -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..mib {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    }

    #[test]
    fn a_volume_holds_its_size_and_no_more_keeps_its_data_and_grows_but_never_shrinks() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a volume needs root");
            return;
        }
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("vol");
        let _guard = Unmount(dir.clone());
        let w = workload(&dir, 16 << 20);
        prepare(&w, None).expect("prepare");
        let mp = mount_point(&dir, "data");
        assert!(is_mounted(&mp));
        std::fs::write(mp.join("kept"), "hello").expect("write");
        // Past the quota: no space, whoever writes.
        let err = fill(&mp.join("big"), 32).expect_err("a write past the quota fails");
        assert_eq!(err.raw_os_error(), Some(nix::libc::ENOSPC), "{err}");
        std::fs::remove_file(mp.join("big")).expect("rm");
        // Prepared again (a restart): the same filesystem, data kept.
        prepare(&w, None).expect("again");
        assert_eq!(
            std::fs::read_to_string(mp.join("kept")).expect("read"),
            "hello"
        );
        // Unmounted (an agent on a rebooted node) and prepared again: still there.
        release(&dir);
        assert!(!is_mounted(&mp));
        prepare(&w, None).expect("after a reboot");
        assert_eq!(
            std::fs::read_to_string(mp.join("kept")).expect("read"),
            "hello"
        );
        // Grown (a restart with a bigger size): room for what did not fit, the data kept.
        prepare(&workload(&dir, 48 << 20), None).expect("grow");
        fill(&mp.join("big"), 32).expect("fits after growing");
        assert_eq!(
            std::fs::read_to_string(mp.join("kept")).expect("read"),
            "hello"
        );
        // Never shrunk.
        let e = prepare(&workload(&dir, 16 << 20), None).expect_err("shrink");
        assert!(e.to_string().contains("cannot shrink"), "{e}");
        release(&dir);
        assert!(!is_mounted(&mp));
    }
}
