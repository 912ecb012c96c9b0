//! A real `sluice run` process inside a node's network namespace.
use std::{
    fs::File,
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sluice::redirect::enroll::{Request, Response, Sandbox, call};

use crate::world::Pod;

/// The agent binary: `SLUICE_BIN`, or `target/<profile>/sluice` beside the test binary.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let candidate = profile_dir.join("sluice");
    assert!(
        candidate.exists(),
        "agent binary not found at {} (set SLUICE_BIN or run `cargo xtask build`)",
        candidate.display()
    );
    candidate
}

/// A running agent; stopped (SIGTERM) when dropped.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
    pub socket: PathBuf,
    pub netns: String,
}

impl Agent {
    /// Starts the agent in `netns` with `config`; waits until it is ready.
    pub fn start(netns: &str, config: &Path, dir: &Path) -> Agent {
        Self::start_in(netns, config, dir, None, &[])
    }

    /// [`Agent::start`] with more environment variables (a DaemonSet's `env`).
    pub fn start_with_env(netns: &str, config: &Path, dir: &Path, env: &[(&str, &str)]) -> Agent {
        Self::start_in(netns, config, dir, None, env)
    }

    /// [`Agent::start`], with the agent's process in the cgroup v2 directory `cgroup` when
    /// given, and with more environment variables.
    pub fn start_in(
        netns: &str,
        config: &Path,
        dir: &Path,
        cgroup: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Agent {
        Self::spawn("run", "ready", netns, config, dir, cgroup, env, &[])
    }

    /// [`Agent::start_with_env`] in a mount namespace of its own, as a container runtime runs
    /// it: the host's mounts propagate in (`HostToContainer`, as the DaemonSet's
    /// `/var/run/netns` asks), and each `(file, target)` of `files` is bind-mounted over
    /// `target` there only (e.g. the `/etc/resolv.conf` the kubelet writes for a pod).
    pub fn start_contained(
        netns: &str,
        config: &Path,
        dir: &Path,
        env: &[(&str, &str)],
        files: &[(PathBuf, PathBuf)],
    ) -> Agent {
        Self::spawn("run", "ready", netns, config, dir, None, env, files)
    }

    /// `sluice gateway --config CONFIG` in network namespace `netns` (a gateway pod's), waiting
    /// until it has applied its routes; its log is `DIR/gateway-N.log`.
    pub fn start_gateway(netns: &str, config: &Path, dir: &Path) -> Agent {
        Self::spawn(
            "gateway",
            "gateway routes applied",
            netns,
            config,
            dir,
            None,
            &[],
            &[],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        command: &str,
        ready: &str,
        netns: &str,
        config: &Path,
        dir: &Path,
        cgroup: Option<&Path>,
        env: &[(&str, &str)],
        files: &[(PathBuf, PathBuf)],
    ) -> Agent {
        let binds: Vec<(std::ffi::CString, std::ffi::CString)> = files
            .iter()
            .map(|(from, to)| {
                use std::os::unix::ffi::OsStrExt;
                let c = |p: &Path| {
                    std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
                };
                assert!(from.exists(), "{} to mount is missing", from.display());
                (c(from), c(to))
            })
            .collect();
        let contained = !binds.is_empty();
        let prefix = if command == "run" { "agent" } else { command };
        let runs = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("{prefix}-"))
                    })
                    .count()
            })
            .unwrap_or(0);
        let log = dir.join(format!("{prefix}-{runs}.log"));
        let log_file = File::create(&log).expect("agent log");
        let ns = File::open(Path::new("/run/netns").join(netns)).expect("node netns");
        let mut cmd = Command::new(agent_bin());
        cmd.args([command, "--config"])
            .arg(config)
            .env("SLUICE_LOG_FORMAT", "json")
            .env(
                "SLUICE_LOG",
                std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file);
        let procs = cgroup.map(|dir| {
            std::fs::create_dir_all(dir).expect("agent cgroup");
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .expect("open agent cgroup.procs")
        });
        // SAFETY: only write, setns, unshare and mount, with descriptors and strings made before
        // fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    let zero = b"0";
                    if libc::write(procs.as_raw_fd(), zero.as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if contained {
                    if libc::unshare(libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // Host mounts propagate in, ours never out.
                    if libc::mount(
                        c"none".as_ptr(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_SLAVE,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    for (from, to) in &binds {
                        if libc::mount(
                            from.as_ptr(),
                            to.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ) != 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start sluice");
        let mut agent = Agent {
            child: Some(child),
            log,
            socket: dir.join("enroll.sock"),
            netns: netns.into(),
        };
        agent.wait_for_log(
            |l| l["message"] == ready,
            Duration::from_secs(30),
            &format!("sluice {command}: {ready}"),
        );
        agent
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's log lines so far, parsed.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for a log line matching `pred`; panics with the log tail after `timeout`.
    pub fn wait_for_log(
        &mut self,
        pred: impl Fn(&serde_json::Value) -> bool,
        timeout: Duration,
        what: &str,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(10);
        loop {
            if let Some(line) = self.log_lines().into_iter().find(|l| pred(l)) {
                return line;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "agent exited ({status}) while waiting for {what}:\n{}",
                    self.tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; agent log:\n{}",
                self.tail()
            );
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// The last lines of the log, for failure messages.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Sends a request to the enrollment API.
    pub fn call(&self, request: &Request) -> Response {
        call(&self.socket, request)
            .unwrap_or_else(|e| panic!("enrollment API: {e:#}\n{}", self.tail()))
    }

    /// Reports `pod`'s sandbox.
    pub fn enroll(&self, pod: &Pod) -> Response {
        self.call(&Request::Add {
            pod: Sandbox {
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                netns: pod.netns_path(),
                cgroup: Some(pod.cgroup.clone()),
                ips: vec![pod.ipv4, pod.ipv6],
            },
        })
    }

    /// Access-log lines (target `sluice::access`).
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.log_lines()
            .into_iter()
            .filter(|l| l["target"] == "sluice::access")
            .collect()
    }

    /// Waits until at least `n` access-log lines match `pred` (lines are written when a
    /// connection ends, a moment after the client sees it end); returns how many match.
    pub fn wait_access(&self, n: usize, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let count = self.access_log().iter().filter(|l| pred(l)).count();
            if count >= n || Instant::now() > deadline {
                return count;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits up to `timeout` for the agent to exit on its own (after handing over and
    /// draining); its exit status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the agent gets no chance to clean up (a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
