//! `sluice-box`: runs the cluster box (`sluice_tests::cluster`) until SIGTERM or SIGINT, for
//! trying Sluice by hand. `cargo xtask cluster up|down|status` drives it.
//!
//! `sluice-box STATE_DIR [NODES]` brings the box up, writes `STATE_DIR/kubeconfig` (admin) and
//! `STATE_DIR/ready`, then waits; on a signal it removes everything it made and `STATE_DIR`.
use std::{path::PathBuf, time::Instant};

use sluice_tests::cluster::Cluster;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(state) = args.next().map(PathBuf::from) else {
        eprintln!("usage: sluice-box STATE_DIR [NODES]");
        std::process::exit(2);
    };
    let nodes: usize = match args.next().map(|n| n.parse()) {
        None => 2,
        Some(Ok(n)) if (1..=9).contains(&n) => n,
        Some(_) => {
            eprintln!("NODES must be 1 to 9");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = state.clone();
    rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        let started = Instant::now();
        let mut cluster = Cluster::up(nodes).await;
        cluster.start_agents().await;
        std::fs::copy(cluster.kubeconfig(), dir.join("kubeconfig")).expect("kubeconfig");
        let mut about = format!(
            "nodes: {nodes}\nup in: {:.1} s\nkubeconfig: {}\n",
            started.elapsed().as_secs_f64(),
            dir.join("kubeconfig").display()
        );
        for i in 1..=nodes {
            about.push_str(&format!(
                "node{i}: netns {}, agent log {}\n",
                cluster.world.node_netns(i),
                cluster.agent(i).log.display()
            ));
        }
        std::fs::write(dir.join("ready"), about).expect("ready file");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("sluice-box: taking the box down");
        drop(cluster);
    });
    let _ = std::fs::remove_dir_all(&state);
}
