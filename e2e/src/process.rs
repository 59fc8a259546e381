//! Child processes that cannot outlive their parent.

use std::{
    process::{Child, Command},
    sync::{Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Makes the kernel kill the child when the thread that spawns it ends, so a crashed or killed
/// test leaves no etcd or API server behind.
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs between fork and exec and calls only prctl(2), which is
    // async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

/// Sends SIGTERM to every child, waits up to five seconds for all of them, then SIGKILLs the rest.
pub fn stop_all(mut children: Vec<Child>) {
    for child in &children {
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        if children.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` (prepared with [`die_with_parent`]) from a thread that lives as long as the
/// process. The parent-death signal follows the *thread* that forked: a child spawned from a
/// test's runtime worker would be killed when that test ends, not when the process does.
pub fn spawn_kept(cmd: Command) -> std::io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("tether-e2e-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // Never return: children die with this thread.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawning the process keeper thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    keeper
        .lock()
        .expect("the keeper's sender")
        .send((cmd, tx))
        .map_err(|_| std::io::Error::other("the process keeper thread is gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the process keeper thread is gone"))?
}
