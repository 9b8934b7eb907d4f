// SPDX-License-Identifier: Apache-2.0
//! Unix-socket connections whose SO_PEERCRED is a real system user, for gRPC tests that
//! call the broker in-process as a worker (`users::run_as` covers whole programs).
//!
//! The kernel records the peer credentials of whoever calls connect(2). The test (root)
//! creates the socket, forks a child that takes the user's uid, gid and groups and
//! connects that same socket (the open file description is shared), then exits; the
//! parent keeps a connection the broker sees as coming from the user.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Uid, User, fork, getgrouplist, setgroups, setresgid, setresuid};

/// Connects to the Unix socket `path` as system user `user` (uid, primary gid and
/// supplementary groups from the user database). Panics with the reason on failure.
pub fn connect_as(user: &str, path: &Path) -> std::os::unix::net::UnixStream {
    let u = User::from_name(user).ok().flatten().unwrap_or_else(|| panic!("no user {user}"));
    let name = std::ffi::CString::new(user).expect("user name");
    let groups = getgrouplist(&name, u.gid).expect("getgrouplist");
    let addr = UnixAddr::new(path).expect("socket path");
    let sock: OwnedFd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket");
    let fd = sock.as_raw_fd();
    // SAFETY: the child only makes async-signal-safe system calls on data prepared before
    // the fork (setgroups, setresgid, setresuid, connect, _exit) and never returns.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let ok = setgroups(&groups).is_ok()
                && setresgid(u.gid, u.gid, u.gid).is_ok()
                && setresuid(u.uid, u.uid, u.uid).is_ok()
                && Uid::effective() == u.uid
                && Gid::effective() == u.gid
                && connect(fd, &addr).is_ok();
            // SAFETY: _exit(2) ends the child at once, without running the parent's atexit
            // handlers or destructors (which must not run twice).
            unsafe { nix::libc::_exit(if ok { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => {
            let st = waitpid(child, None).expect("waitpid");
            assert!(matches!(st, WaitStatus::Exited(_, 0)), "connect as {user} to {} failed: {st:?}", path.display());
        }
    }
    std::os::unix::net::UnixStream::from(sock)
}
