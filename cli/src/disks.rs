// SPDX-License-Identifier: Apache-2.0
//! `piccoloctl disks` and `piccoloctl install --plan|--run`.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{ArgGroup, Args};
use piccolo_proto::v1::disks_client::DisksClient;
use piccolo_proto::v1::{
    Image, InstallHeader, InstallToDiskRequest, ListDisksRequest, PlanInstallRequest, image, install_to_disk_request,
    install_to_disk_response,
};

use crate::Failure;
use crate::broker::channel;
use crate::output::{status_failure, table};

/// Chunk size for streamed images (the broker's limit).
const CHUNK: usize = 1 << 20;

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20))
}

/// `piccoloctl disks`.
pub async fn list(socket: &Path, json: bool) -> Result<(), Failure> {
    let mut c = DisksClient::new(channel(socket).await?);
    let disks = c.list_disks(ListDisksRequest {}).await.map_err(|s| status_failure(&s))?.into_inner().disks;
    if json {
        let v: Vec<_> = disks
            .iter()
            .map(|d| {
                serde_json::json!({
                    "name": d.name, "size_bytes": d.size_bytes, "model": d.model, "removable": d.removable,
                    "rotational": d.rotational, "transport": d.transport, "holds_running_system": d.holds_running_system,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    let yn = |b: bool| if b { "yes" } else { "no" }.to_string();
    let rows: Vec<Vec<String>> = disks
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                mib(d.size_bytes),
                d.transport.clone(),
                yn(d.removable),
                yn(d.rotational),
                yn(d.holds_running_system),
                d.model.clone(),
            ]
        })
        .collect();
    table(&["NAME", "SIZE", "TRANSPORT", "REMOVABLE", "ROTATIONAL", "SYSTEM", "MODEL"], &rows);
    Ok(())
}

/// `piccoloctl install ...`
#[derive(Args)]
#[command(group(ArgGroup::new("mode").required(true).args(["plan", "run"])))]
#[command(group(ArgGroup::new("source").required(true).args(["image", "stream"])))]
pub struct InstallArgs {
    /// Only show what would be overwritten.
    #[arg(long)]
    plan: bool,
    /// Install.
    #[arg(long)]
    run: bool,
    /// Target disk (kernel name, e.g. nvme0n1).
    #[arg(long)]
    target: String,
    /// Image file in one of the broker's image directories (a path on the broker's host).
    #[arg(long)]
    image: Option<String>,
    /// Local image file to stream to the broker.
    #[arg(long)]
    stream: Option<PathBuf>,
    /// Expected SHA-256 of the image (hex); required with --run.
    #[arg(long)]
    sha256: Option<String>,
}

fn image_of(a: &InstallArgs) -> Result<(Image, Option<std::fs::File>), Failure> {
    if let Some(p) = &a.image {
        return Ok((Image { source: Some(image::Source::Path(p.clone())) }, None));
    }
    let path = a.stream.as_ref().ok_or_else(|| Failure::new(2, "give --image or --stream"))?;
    let f = std::fs::File::open(path).map_err(|e| Failure::new(1, format!("cannot open {}: {e}", path.display())))?;
    let len = f.metadata().map_err(|e| Failure::new(1, format!("cannot stat {}: {e}", path.display())))?.len();
    Ok((Image { source: Some(image::Source::StreamSize(len)) }, Some(f)))
}

/// Runs `install --plan` or `install --run`.
pub async fn install(socket: &Path, a: InstallArgs) -> Result<(), Failure> {
    let mut c = DisksClient::new(channel(socket).await?);
    let (image, file) = image_of(&a)?;
    if a.plan {
        let req = PlanInstallRequest { target: a.target.clone(), image: Some(image) };
        let p = c.plan_install(req).await.map_err(|s| status_failure(&s))?.into_inner();
        let t = p.target.unwrap_or_default();
        println!("target     {} ({}, {}, {:?})", t.name, mib(t.size_bytes), t.transport, t.model);
        let src = if p.image_path.is_empty() { "streamed image".to_string() } else { p.image_path.clone() };
        println!("image      {src} ({})", mib(p.image_bytes));
        println!("overwrites bytes 0..{} of {}", p.image_bytes, t.size_bytes);
        if p.wiped_length > 0 {
            println!(
                "zeroes     bytes {}..{} (the old backup partition table)",
                p.wiped_offset,
                p.wiped_offset + p.wiped_length
            );
        }
        println!("table      {}", if p.has_gpt { "GPT, replaced" } else { "no GPT" });
        println!();
        let rows: Vec<Vec<String>> = p
            .partitions
            .iter()
            .map(|x| {
                let how = if x.fully_overwritten { "overwritten" } else { "partly overwritten, entry lost" };
                vec![x.number.to_string(), x.name.clone(), x.start.to_string(), mib(x.size), how.into()]
            })
            .collect();
        table(&["PART", "NAME", "START", "SIZE", "FATE"], &rows);
        return Ok(());
    }
    let sha256 = a.sha256.clone().ok_or_else(|| Failure::new(2, "--run needs --sha256"))?;
    let header = InstallToDiskRequest {
        msg: Some(install_to_disk_request::Msg::Header(InstallHeader {
            target: a.target.clone(),
            image: Some(image),
            sha256,
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header).await.map_err(|_| Failure::new(1, "cannot queue the request"))?;
    if let Some(mut f) = file {
        // The file is read on a blocking thread and streamed in 1 MiB chunks.
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let m =
                            InstallToDiskRequest { msg: Some(install_to_disk_request::Msg::Chunk(buf[..n].to_vec())) };
                        if tx.blocking_send(m).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    } else {
        drop(tx);
    }
    let mut responses = c
        .install_to_disk(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| status_failure(&s))?
        .into_inner();
    loop {
        match responses.message().await.map_err(|s| status_failure(&s))? {
            Some(m) => match m.msg {
                Some(install_to_disk_response::Msg::Progress(p)) => {
                    eprintln!("{:<9}  {} / {}", p.phase, mib(p.done), mib(p.total));
                }
                Some(install_to_disk_response::Msg::Result(r)) => {
                    println!(
                        "installed {} bytes onto {} (sha256 {}), verified by reading back",
                        r.bytes, r.target, r.sha256
                    );
                    return Ok(());
                }
                None => {}
            },
            None => return Err(Failure::new(1, "the broker ended the install without a result")),
        }
    }
}
