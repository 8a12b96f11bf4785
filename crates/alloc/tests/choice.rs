//! The allocator is chosen from the environment once, for the whole process: each
//! case runs this test binary again (as a child) with the variable set or not.

use std::process::Command;

#[global_allocator]
static ALLOCATOR: verge_alloc::Chosen = verge_alloc::Chosen;

const CHILD: &str = "VERGE_ALLOC_TEST_CHILD";

#[test]
fn the_environment_picks_the_allocator_for_the_whole_process() {
    let exe = std::env::current_exe().expect("the test binary");
    for (value, chosen) in [
        (Some("mimalloc"), "mimalloc"),
        (Some("system"), "system"),
        (Some("jemalloc"), "system"),
        (None, "system"),
    ] {
        let mut child = Command::new(&exe);
        child
            .args(["--exact", "child_allocates_across_threads", "--nocapture"])
            .env(CHILD, "1");
        match value {
            Some(v) => child.env(verge_alloc::ENV, v),
            None => child.env_remove(verge_alloc::ENV),
        };
        let out = child.output().expect("running the child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{value:?}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("allocator={chosen}\n")),
            "{value:?}: {stdout}"
        );
    }
}

/// Run only as the child above: blocks made on one thread are grown and freed on
/// others, and the allocator's name is printed.
#[test]
fn child_allocates_across_threads() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let maker = std::thread::spawn(move || {
        for i in 0..20_000usize {
            tx.send(vec![i as u8; 1 + i % 4096])
                .expect("the taker is there");
        }
    });
    let taker = std::thread::spawn(move || {
        let mut total = 0usize;
        for mut v in rx {
            v.extend_from_slice(&[1; 100]);
            total += v.len();
        }
        total
    });
    maker.join().expect("maker");
    assert!(taker.join().expect("taker") > 20_000 * 100);
    println!("allocator={}", verge_alloc::name());
}
