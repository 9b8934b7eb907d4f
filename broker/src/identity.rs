// SPDX-License-Identifier: Apache-2.0
//! Who is calling: SO_PEERCRED uid/gid (captured by the kernel at connect, not spoofable),
//! plus the uid's supplementary groups. pid, executable and unit are for the audit log only.

use std::sync::Arc;

use piccolo_audit::Caller;
use tonic::transport::server::UdsConnectInfo;

use crate::error::Error;

/// The caller as the broker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Peer uid.
    pub uid: u32,
    /// Peer (effective) gid.
    pub gid: u32,
    /// Peer pid at connect time.
    pub pid: Option<i32>,
    /// Name of `uid`.
    pub user: Option<String>,
    /// Supplementary groups of `uid` (gid, name), from the group database.
    pub groups: Vec<(u32, String)>,
    /// `/proc/<pid>/exe`.
    pub exe: Option<String>,
    /// systemd unit from `/proc/<pid>/cgroup`.
    pub unit: Option<String>,
}

/// What the broker learns about a connection's peer once, when it accepts the connection:
/// the SO_PEERCRED credentials and the peer's executable and systemd unit. tonic copies it
/// into every request of the connection ([`tonic::transport::server::Connected`]).
///
/// Read per connection, not per call and not cached by pid: the credentials belong to the
/// connection anyway, and a pid can exit and be reused by another process while the
/// connection stays open, so reading `/proc/<pid>` as early as possible (at accept, right
/// after connect) names the process that connected more reliably than a read at each call.
/// User name and groups are not part of it: they follow the user database ([`names`]).
#[derive(Debug, Clone)]
pub struct PeerInfo(Arc<Peer>);

#[derive(Debug)]
struct Peer {
    uds: UdsConnectInfo,
    exe: Option<String>,
    unit: Option<String>,
}

impl PeerInfo {
    /// Captures the peer of an accepted connection.
    pub fn new(uds: UdsConnectInfo) -> PeerInfo {
        let pid = uds.peer_cred.and_then(|c| c.pid());
        let exe = pid.and_then(|p| std::fs::read_link(format!("/proc/{p}/exe")).ok()).map(|p| p.display().to_string());
        let unit =
            pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/cgroup")).ok()).and_then(|s| unit_of(&s));
        PeerInfo(Arc::new(Peer { uds, exe, unit }))
    }
}

impl Identity {
    /// The caller of this request: its connection's peer, completed with user name and groups.
    pub fn of_request<T>(req: &tonic::Request<T>) -> Result<Identity, Error> {
        let peer = req.extensions().get::<PeerInfo>().ok_or(Error::NoPeerCredentials)?;
        let cred = peer.0.uds.peer_cred.ok_or(Error::NoPeerCredentials)?;
        let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
        let (user, groups) = names::of_uid(uid);
        Ok(Identity { uid, gid, pid, user, groups, exe: peer.0.exe.clone(), unit: peer.0.unit.clone() })
    }

    /// The audit log's view of the caller.
    pub fn caller(&self) -> Caller {
        Caller {
            uid: self.uid,
            gid: self.gid,
            pid: self.pid,
            user: self.user.clone(),
            exe: self.exe.clone(),
            unit: self.unit.clone(),
        }
    }
}

/// User name and supplementary groups per uid, cached briefly: the group database is read
/// on every call otherwise, and membership changes take effect within [`names::TTL`]
/// (at once on SIGHUP, which clears the cache).
pub mod names {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// How long a lookup is reused.
    pub const TTL: Duration = Duration::from_secs(2);

    type Entry = (Instant, Option<String>, Vec<(u32, String)>);
    static CACHE: Mutex<Option<HashMap<u32, Entry>>> = Mutex::new(None);

    /// (user name, supplementary groups) of `uid`.
    pub fn of_uid(uid: u32) -> (Option<String>, Vec<(u32, String)>) {
        let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        let map = cache.get_or_insert_with(HashMap::new);
        if let Some((at, user, groups)) = map.get(&uid)
            && at.elapsed() < TTL
        {
            return (user.clone(), groups.clone());
        }
        let (user, groups) = lookup(uid);
        // Bounded: one entry per distinct caller uid, and stale ones are replaced.
        if map.len() > 4096 {
            map.clear();
        }
        map.insert(uid, (Instant::now(), user.clone(), groups.clone()));
        (user, groups)
    }

    /// Forgets every cached lookup.
    pub fn clear() {
        if let Some(m) = CACHE.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            m.clear();
        }
    }

    fn lookup(uid: u32) -> (Option<String>, Vec<(u32, String)>) {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten();
        let mut groups = Vec::new();
        if let Some(u) = &user
            && let Ok(name) = std::ffi::CString::new(u.name.as_bytes())
            && let Ok(gids) = nix::unistd::getgrouplist(&name, u.gid)
        {
            for g in gids {
                let gname = nix::unistd::Group::from_gid(g).ok().flatten().map(|g| g.name).unwrap_or_default();
                groups.push((g.as_raw(), gname));
            }
        }
        (user.map(|u| u.name), groups)
    }
}

/// The innermost `*.service` (or `*.scope`) in a `/proc/<pid>/cgroup` listing.
fn unit_of(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|l| {
        let path = l.splitn(3, ':').nth(2)?;
        path.rsplit('/').find(|c| c.ends_with(".service") || c.ends_with(".scope")).map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use tonic::transport::server::Connected;

    /// A real socket pair: the peer seen on one end is this process, read at accept time.
    #[tokio::test]
    async fn peer_info_names_the_connecting_process() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let peer = super::PeerInfo::new(a.connect_info());
        let cred = peer.0.uds.peer_cred.expect("SO_PEERCRED");
        assert_eq!(cred.pid(), Some(i32::try_from(std::process::id()).unwrap()));
        assert_eq!(cred.uid(), nix::unistd::geteuid().as_raw());
        let exe = std::fs::read_link("/proc/self/exe").unwrap().display().to_string();
        assert_eq!(peer.0.exe.as_deref(), Some(exe.as_str()));
        // Clones share the one read: tonic hands a clone to every request of the connection.
        let again = peer.clone();
        assert!(std::sync::Arc::ptr_eq(&peer.0, &again.0));
    }

    #[test]
    fn unit_from_cgroup() {
        assert_eq!(super::unit_of("0::/system.slice/piccolo-api.service\n").as_deref(), Some("piccolo-api.service"));
        assert_eq!(super::unit_of("0::/\n"), None);
    }
}
