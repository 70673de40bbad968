//! A database stack on a cluster volume, the way Swarm users run one: `docker stack deploy`
//! of examples/swarm-mariadb-cluster.yml (MariaDB 10.11, the offline test image), rows written
//! with the mariadb client inside the task, `docker stack rm`, deploy again: the rows are
//! there (the stack never owns the volume, so its data is retained), and `docker volume rm`
//! once the stack is gone leaves nothing on the backend.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

use crate::docker_common::Docker;
use crate::harness::*;

/// Loads the offline MariaDB image (an OCI layout tarball from tests/infra/images.sh) into the
/// engine. Docker 28's own image store loads only `docker save` archives, which carry a
/// manifest.json; the OCI layout has the same blobs, so one is added to a copy.
fn load_mariadb(d: &Docker, tag: &str) {
    if d.run(&["image", "inspect", tag]).status.success() {
        return;
    }
    let src = PathBuf::from(std::env::var("STOWAGE_MARIADB_IMAGE").expect(
        "STOWAGE_MARIADB_IMAGE: the MariaDB image tarball (tests/infra/images.sh build mariadb)",
    ));
    let member = |name: &str| -> Vec<u8> {
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(&src)
            .arg(format!("./{name}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} in {}", src.display());
        out.stdout
    };
    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let index: Value = serde_json::from_slice(&member("index.json")).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: Value = serde_json::from_slice(&member(&blob(digest))).unwrap();
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| blob(l["digest"].as_str().unwrap()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    std::fs::copy(&src, &archive).unwrap();
    let docker_manifest = serde_json::json!([{
        "Config": blob(manifest["config"]["digest"].as_str().unwrap()),
        "RepoTags": [tag],
        "Layers": layers,
    }]);
    std::fs::write(
        dir.path().join("manifest.json"),
        docker_manifest.to_string(),
    )
    .unwrap();
    let st = Command::new("tar")
        .arg("-rf")
        .arg(&archive)
        .arg("-C")
        .arg(dir.path())
        .arg("manifest.json")
        .status()
        .unwrap();
    assert!(st.success());
    let t0 = Instant::now();
    d.ok(&["load", "-q", "-i", archive.to_str().unwrap()]);
    eprintln!(
        "stack: MariaDB image loaded in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

/// The running container of a stack's service, once there is one.
fn task_container(d: &Docker, svc: &str) -> Option<String> {
    let ids = d.ok(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.swarm.service.name={svc}"),
    ]);
    ids.lines().next().map(str::to_string)
}

/// Runs SQL with the mariadb client inside the task's container.
fn sql(d: &Docker, container: &str, query: &str) -> std::process::Output {
    d.run(&[
        "exec",
        container,
        "mariadb",
        "-uroot",
        "--batch",
        "--skip-column-names",
        "-e",
        query,
    ])
}

/// Deploys the stack and waits until MariaDB answers in its task; returns the container.
fn deploy(p: &CsiPlugin, files: &[&Path], env: &[(&str, &str)], stack: &str, vol: &str) -> String {
    let mut cmd = Command::new("timeout");
    cmd.arg("180").arg(&p.docker.cli).args([
        "stack",
        "deploy",
        "--detach=true",
        "--resolve-image",
        "never",
    ]);
    for f in files {
        cmd.arg("-c").arg(f);
    }
    let out = cmd
        .arg(stack)
        .env("DOCKER_HOST", &p.docker.host)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stack deploy: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let svc = format!("{stack}_db");
    let t0 = Instant::now();
    let c = wait_for(
        "MariaDB to answer in the stack's task",
        240,
        || {
            let ps = p.docker.run(&["service", "ps", "--no-trunc", &svc]);
            format!("{}\n{}", String::from_utf8_lossy(&ps.stdout), p.diag(vol))
        },
        || {
            let c = task_container(&p.docker, &svc)?;
            sql(&p.docker, &c, "SELECT 1").status.success().then_some(c)
        },
    );
    eprintln!(
        "stack: deployed to MariaDB answering in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    c
}

/// `docker stack rm`, then waits until the task's container is gone and Swarm has unpublished
/// the volume (a single-node volume is published to one task at a time).
fn stack_rm(p: &CsiPlugin, stack: &str, vol: &str) {
    p.docker.ok(&["stack", "rm", stack]);
    p.wait_containers_gone(&format!("{stack}_db"));
    wait_for(
        "the volume to be unpublished",
        90,
        || p.diag(vol),
        || (!p.published(vol)).then_some(()),
    );
}

/// Whether any file under `dir` holds `needle` (InnoDB's redo log has every committed row at
/// once; the table's own file once the page is flushed).
fn bytes_under(dir: &Path, needle: &[u8]) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            bytes_under(&p, needle)
        } else {
            std::fs::read(&p)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        }
    })
}

#[test]
fn mariadb_stack_keeps_its_rows_on_a_cluster_volume() {
    let Some(docker) = cluster_docker() else {
        return;
    };
    let image = "localhost/stowage/mariadb:10.11";
    load_mariadb(&docker, image);
    let data = tempfile::tempdir().unwrap();
    let p = CsiPlugin::install(&docker, LOCAL_CONFIG, Some(data.path()));
    let vol = p.volume("mariadb");
    p.create_mount(&vol, "single", "onewriter", "256MiB", &[]);
    let v = p.wait_created(&vol);
    let id = volume_id(&v);
    let dir = data.path().join(id.rsplit('/').next().unwrap());
    assert!(dir.is_dir(), "{}", dir.display());

    // The shipped stack file as users deploy it, plus an override for this machine: the
    // offline image has no entrypoint of its own (the pod tests' script makes the database).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = root.join("examples/swarm-mariadb-cluster.yml");
    let work = tempfile::tempdir().unwrap();
    let secret_file = work.path().join("pw");
    std::fs::write(&secret_file, "unused-by-the-test-entrypoint").unwrap();
    let secret = p.volume("mariadb-root");
    let secret_id = p
        .docker
        .ok(&["secret", "create", &secret, secret_file.to_str().unwrap()]);
    let _secrets = Secrets {
        docker: p.docker.clone(),
        names: vec![secret_id],
    };
    let over = work.path().join("override.yml");
    std::fs::write(
        &over,
        format!(
            "services:\n  db:\n    image: {image}\n    entrypoint: [\"/bin/sh\", \"/stowage-entrypoint.sh\"]\n    environment:\n      DATADIR: /var/lib/mysql/db\n    labels:\n      stowage-test: {label}\n    configs:\n      - source: entry\n        target: /stowage-entrypoint.sh\n        mode: 0555\nconfigs:\n  entry:\n    file: {entry}\n",
            label = p.label,
            entry = root.join("tests/pods/mariadb-entrypoint.sh").display()
        ),
    )
    .unwrap();
    let env = [
        ("MARIADB_IMAGE", image),
        ("MARIADB_VOLUME", vol.as_str()),
        ("MARIADB_ROOT_SECRET", secret.as_str()),
    ];
    let stack = format!("st{}", p.label.rsplit('-').next().unwrap_or("x"));
    let files = [example.as_path(), over.as_path()];
    let _stack = Stack {
        docker: p.docker.clone(),
        name: stack.clone(),
    };

    let c = deploy(&p, &files, &env, &stack, &vol);
    let marker = format!("row-{}", p.label);
    let out = sql(
        &p.docker,
        &c,
        &format!(
            "CREATE TABLE stowage.t (id INT PRIMARY KEY, v VARCHAR(80)) ENGINE=InnoDB; \
             INSERT INTO stowage.t VALUES (1, '{marker}-1'), (2, '{marker}-2');"
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The bytes are on the backend: the volume's directory holds the database and the rows.
    assert!(dir.join("db/stowage").is_dir(), "{}", dir.display());
    assert!(
        bytes_under(&dir.join("db"), marker.as_bytes()),
        "rows on the backend"
    );

    let t0 = Instant::now();
    stack_rm(&p, &stack, &vol);
    eprintln!("stack: removed in {:.1}s", t0.elapsed().as_secs_f64());
    // Retain: the stack is gone, the cluster volume and its data are not.
    assert!(p.inspect(&vol).is_some(), "volume survives stack rm");
    assert!(bytes_under(&dir.join("db"), marker.as_bytes()));

    let c = deploy(&p, &files, &env, &stack, &vol);
    let out = sql(&p.docker, &c, "SELECT v FROM stowage.t ORDER BY id");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{marker}-1\n{marker}-2\n"),
        "the rows written before stack rm"
    );

    // Deleting the data is explicit: stack gone, volume drained and removed, nothing left.
    stack_rm(&p, &stack, &vol);
    p.remove_volume(&vol);
    assert!(!dir.exists(), "DeleteVolume removed {}", dir.display());
}

/// The stack removed when the test ends, whatever it did.
struct Stack {
    docker: Docker,
    name: String,
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.docker.run(&["stack", "rm", &self.name]);
    }
}
