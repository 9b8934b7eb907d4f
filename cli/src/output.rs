// SPDX-License-Identifier: Apache-2.0
//! Plain aligned tables and the mapping of broker errors to messages and exit codes.

use crate::Failure;

/// Prints rows as aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Turns a broker status into a message and exit code.
pub fn status_failure(s: &tonic::Status) -> Failure {
    match s.code() {
        tonic::Code::PermissionDenied => {
            Failure::new(3, format!("access denied by the broker policy: {}", s.message()))
        }
        tonic::Code::Unavailable => Failure::new(4, format!("broker unavailable: {}", s.message())),
        tonic::Code::InvalidArgument => Failure::new(2, format!("invalid argument: {}", s.message())),
        _ => Failure::new(1, format!("{:?}: {}", s.code(), s.message())),
    }
}

/// Turns a connection error into a message and exit code.
pub fn connect_failure(e: &piccolo_proto::client::ConnectError) -> Failure {
    let code = if e.source.kind() == std::io::ErrorKind::PermissionDenied { 3 } else { 4 };
    Failure::new(code, e.to_string())
}
