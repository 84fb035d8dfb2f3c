//! The harness itself: clusters of both versions start, answer, and leave nothing behind.

use gprxy_tests::{process_alive, Cluster, PgVersion};

fn start_query_and_clean_up(version: PgVersion) {
    let cluster = Cluster::builder(version).conf("work_mem = '8MB'").start();
    let major = cluster.sql("SHOW server_version_num");
    assert!(major.starts_with(&version.to_string()), "server_version_num {major} for {version}");
    assert_eq!(cluster.sql("SHOW work_mem"), "8MB");
    assert_eq!(cluster.sql("SELECT 6 * 7"), "42");
    assert!(cluster.try_sql("SELEC 1").unwrap_err().contains("syntax error"));
    let (pid, root, port) = (cluster.pid(), cluster.root().to_path_buf(), cluster.port());
    assert!(process_alive(pid));
    assert!(root.exists());
    drop(cluster);
    assert!(!process_alive(pid), "postmaster {pid} still running after drop");
    assert!(!root.exists(), "{} left behind", root.display());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "port {port} still answers");
}

#[test]
fn postgres_18_starts_answers_and_cleans_up() {
    start_query_and_clean_up(PgVersion::V18);
}

#[test]
fn postgres_15_starts_answers_and_cleans_up() {
    start_query_and_clean_up(PgVersion::V15);
}

#[test]
fn hba_and_ident_lines_are_applied() {
    let cluster =
        Cluster::builder(PgVersion::V18).hba("host all all 127.0.0.1/32 reject").ident("m alice bob").start();
    assert!(cluster
        .sql("SELECT count(*) FROM pg_hba_file_rules WHERE auth_method = 'reject'")
        .starts_with('1'));
    assert_eq!(
        cluster.sql("SELECT map_name || ':' || sys_name || ':' || pg_username FROM pg_ident_file_mappings"),
        "m:alice:bob"
    );
}

#[test]
fn a_panicking_test_still_stops_and_deletes_its_cluster() {
    let seen = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let c = Cluster::start(PgVersion::V15);
        *seen.lock().unwrap() = Some((c.pid(), c.root().to_path_buf()));
        panic!("deliberate panic with a running cluster");
    });
    assert!(r.is_err());
    let (pid, root) = seen.lock().unwrap().take().expect("cluster started");
    assert!(!process_alive(pid), "postmaster {pid} survived the panic");
    assert!(!root.exists(), "{} survived the panic", root.display());
}
