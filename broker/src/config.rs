// SPDX-License-Identifier: Apache-2.0
//! Broker configuration: an optional TOML file, overridden by command-line flags.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use piccolo_proto::paths;

/// Command-line flags. Parsed by hand ([`Args::parse_from`]): ten flags do not need clap,
/// whose parser is otherwise ~200 KiB of resident code in a process that never exits.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    /// Config file (TOML). Default: /etc/piccolo/broker-config.toml if it exists.
    pub config: Option<PathBuf>,
    /// Socket path.
    pub socket: Option<PathBuf>,
    /// Group that owns the socket directory and socket.
    pub socket_group: Option<String>,
    /// Policy file.
    pub policy: Option<PathBuf>,
    /// Audit log path.
    pub audit_log: Option<PathBuf>,
    /// Group that may read the audit log.
    pub audit_group: Option<String>,
    /// Rotate the audit log at this size.
    pub audit_max_bytes: Option<u64>,
    /// Validate a policy file, print the effective caller × RPC table, and exit.
    pub check_policy: Option<PathBuf>,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Run (or `--check-policy`) with these flags.
    Run(Args),
    /// Print [`USAGE`] and exit 0.
    Help,
    /// Print the version and exit 0.
    Version,
}

/// `--help` text.
pub const USAGE: &str = "piccolo's privileged broker

Usage: piccolo-broker [OPTIONS]

Options:
      --config <FILE>          Config file (TOML). Default: /etc/piccolo/broker-config.toml if it exists
      --socket <PATH>          Socket path
      --socket-group <GROUP>   Group that owns the socket directory and socket
      --policy <FILE>          Policy file
      --audit-log <PATH>       Audit log path
      --audit-group <GROUP>    Group that may read the audit log
      --audit-max-bytes <N>    Rotate the audit log at this size
      --check-policy <FILE>    Validate a policy file, print the effective caller × RPC table, and exit
  -h, --help                   Print help
  -V, --version                Print version
";

impl Args {
    /// Parses the arguments after the program name: `--flag VALUE` or `--flag=VALUE`, each
    /// flag at most once. The error names the offending argument.
    pub fn parse_from<I: IntoIterator<Item = std::ffi::OsString>>(args: I) -> Result<Command, String> {
        let mut out = Args::default();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let arg = arg.into_string().map_err(|a| format!("argument {a:?} is not UTF-8"))?;
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            match flag.as_str() {
                "-h" | "--help" if inline.is_none() => return Ok(Command::Help),
                "-V" | "--version" if inline.is_none() => return Ok(Command::Version),
                _ => {}
            }
            let mut value = || match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .ok_or_else(|| format!("{flag} needs a value (see --help)")),
            };
            match flag.as_str() {
                "--config" => set(&mut out.config, &flag, value()?.into())?,
                "--socket" => set(&mut out.socket, &flag, value()?.into())?,
                "--socket-group" => set(&mut out.socket_group, &flag, value()?)?,
                "--policy" => set(&mut out.policy, &flag, value()?.into())?,
                "--audit-log" => set(&mut out.audit_log, &flag, value()?.into())?,
                "--audit-group" => set(&mut out.audit_group, &flag, value()?)?,
                "--audit-max-bytes" => {
                    let v = value()?;
                    let n = v.parse().map_err(|_| format!("--audit-max-bytes: {v:?} is not a byte count"))?;
                    set(&mut out.audit_max_bytes, &flag, n)?;
                }
                "--check-policy" => set(&mut out.check_policy, &flag, value()?.into())?,
                _ => return Err(format!("unknown argument {arg:?} (see --help)")),
            }
        }
        Ok(Command::Run(out))
    }
}

/// Fills a flag's slot; a flag given twice is an error.
fn set<T>(slot: &mut Option<T>, flag: &str, v: T) -> Result<(), String> {
    if slot.replace(v).is_some() {
        return Err(format!("{flag} given more than once"));
    }
    Ok(())
}

/// Settings of the TPM backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TpmConfig {
    /// TCTI string, e.g. `device:/dev/tpmrm0` or `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
    /// The TPM helper program (absolute). Default, filled in by [`Config::load`]:
    /// `piccolo-broker-tpm` in the directory of the broker's own executable, as installed
    /// (`/usr/bin`) and as built (`target/*/`); still `None` if that cannot be found.
    pub helper: Option<PathBuf>,
}

impl Default for TpmConfig {
    fn default() -> Self {
        TpmConfig { tcti: "device:/dev/tpmrm0".into(), helper: None }
    }
}

/// Settings of the EFI variable backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EfiConfig {
    /// efivarfs mount point.
    pub efivars_root: PathBuf,
}

impl Default for EfiConfig {
    fn default() -> Self {
        EfiConfig { efivars_root: PathBuf::from("/sys/firmware/efi/efivars") }
    }
}

/// Settings of the update_engine client.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateEngineConfig {
    /// D-Bus address; the system bus when absent.
    pub bus_address: Option<String>,
}

/// Settings of boot control (A/B slots, disks).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootConfig {
    /// Disk (or image file) holding USR-A/USR-B; found from the running system when absent.
    pub os_disk: Option<PathBuf>,
    /// The slot the running system booted from; found from the running `/usr` when absent.
    pub booted_slot: Option<BootedSlot>,
    /// Directories `InstallToDisk` may read image files from (none: streamed images only).
    pub image_dirs: Vec<PathBuf>,
    /// sysfs mount point (default `/sys`).
    pub sysfs_root: Option<PathBuf>,
    /// Device directory (default `/dev`).
    pub dev_root: Option<PathBuf>,
    /// Mount table (default `/proc/self/mountinfo`).
    pub mountinfo: Option<PathBuf>,
    /// Append reboot requests to this file instead of rebooting (test machines).
    pub reboot_record: Option<PathBuf>,
}

/// Default state directory (`$PICCOLO_STATE_DIR` overrides it).
pub const STATE_DIR: &str = "/var/lib/piccolo";
/// Environment variable naming the state directory.
pub const STATE_DIR_ENV: &str = "PICCOLO_STATE_DIR";

/// Settings of the gocryptfs volumes (`[volumes]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumesConfig {
    /// State directory holding `ciphertext/<id>` and `mounts/<id>` (absolute).
    pub state_dir: PathBuf,
    /// The gocryptfs binary.
    pub gocryptfs: PathBuf,
    /// gocryptfs `-scryptn` at creation (10..=28); see `piccolo_volumes::Runner::scrypt_n`.
    pub scrypt_n: u8,
    /// ImportArchive: most manifest entries (files, dirs, symlinks).
    pub import_max_entries: u64,
    /// ImportArchive: largest single file.
    pub import_max_file_bytes: u64,
    /// ImportArchive: largest sum of file sizes.
    pub import_max_total_bytes: u64,
    /// ImportArchive: largest `manifest.json` (held in memory while it is checked).
    pub import_max_manifest_bytes: u64,
}

/// Upper bounds of the `[volumes] import_*` settings: the archive format's own defaults.
/// A configuration may only lower them (a small board sets smaller caps).
pub fn import_limit_bounds() -> piccolo_keyset::ImportLimits {
    piccolo_keyset::ImportLimits::default()
}

impl VolumesConfig {
    /// The import caps as the archive code takes them.
    pub fn import_limits(&self) -> piccolo_keyset::ImportLimits {
        piccolo_keyset::ImportLimits {
            max_entries: self.import_max_entries,
            max_file_bytes: self.import_max_file_bytes,
            max_total_bytes: self.import_max_total_bytes,
            max_manifest_bytes: self.import_max_manifest_bytes,
        }
    }

    fn import_limits_in_bounds(&self) -> bool {
        let (l, max) = (self.import_limits(), import_limit_bounds());
        (1..=max.max_entries).contains(&l.max_entries)
            && (1..=max.max_file_bytes).contains(&l.max_file_bytes)
            && (1..=max.max_total_bytes).contains(&l.max_total_bytes)
            && (4096..=max.max_manifest_bytes).contains(&l.max_manifest_bytes)
    }
}

impl Default for VolumesConfig {
    fn default() -> Self {
        let state_dir = std::env::var_os(STATE_DIR_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(STATE_DIR));
        let limits = import_limit_bounds();
        VolumesConfig {
            state_dir,
            gocryptfs: PathBuf::from("/usr/bin/gocryptfs"),
            scrypt_n: 10,
            import_max_entries: limits.max_entries,
            // A board's state dir is small; 64 GiB per file and 256 GiB in all are the format's
            // ceilings, kept as defaults so an export made here always imports here.
            import_max_file_bytes: limits.max_file_bytes,
            import_max_total_bytes: limits.max_total_bytes,
            import_max_manifest_bytes: limits.max_manifest_bytes,
        }
    }
}

/// `boot.booted_slot`: `"A"` or `"B"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BootedSlot {
    /// USR-A.
    A,
    /// USR-B.
    B,
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// See [`Args::socket`].
    pub socket: Option<PathBuf>,
    /// See [`Args::socket_group`].
    pub socket_group: Option<String>,
    /// See [`Args::policy`].
    pub policy: Option<PathBuf>,
    /// See [`Args::audit_log`].
    pub audit_log: Option<PathBuf>,
    /// See [`Args::audit_group`].
    pub audit_group: Option<String>,
    /// See [`Args::audit_max_bytes`].
    pub audit_max_bytes: Option<u64>,
    /// Rotated audit files kept.
    pub audit_keep: Option<u32>,
    /// Write zeros ahead of the audit records (default true; see `piccolo_audit::AuditConfig`).
    pub audit_preallocate: Option<bool>,
    /// Maximum simultaneous client connections.
    pub max_connections: Option<usize>,
    /// TPM backend.
    pub tpm: TpmConfig,
    /// EFI variables backend.
    pub efi: EfiConfig,
    /// update_engine client.
    pub update_engine: UpdateEngineConfig,
    /// Boot control.
    pub boot: BootConfig,
    /// gocryptfs volumes.
    pub volumes: VolumesConfig,
}

/// Resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Socket path.
    pub socket: PathBuf,
    /// Socket group name (None: leave the creating user's group).
    pub socket_group: Option<String>,
    /// Policy file.
    pub policy: PathBuf,
    /// Audit log.
    pub audit_log: PathBuf,
    /// Audit group name.
    pub audit_group: Option<String>,
    /// Rotation size.
    pub audit_max_bytes: u64,
    /// Rotated files kept.
    pub audit_keep: u32,
    /// Preallocate the live audit file.
    pub audit_preallocate: bool,
    /// Connection cap.
    pub max_connections: usize,
    /// The rest of the file (backends).
    pub file: FileConfig,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// Parser message (with line).
        message: String,
    },
}

impl Config {
    /// Loads the file named by `--config` (or the default if present) and applies the flags.
    pub fn load(args: &Args) -> Result<Config, ConfigError> {
        let (path, required) = match &args.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(paths::BROKER_CONFIG), false),
        };
        let mut file = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str::<FileConfig>(&text)
                .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => FileConfig::default(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        if !file.volumes.state_dir.is_absolute() || !(10..=28).contains(&file.volumes.scrypt_n) {
            return Err(ConfigError::Parse {
                path,
                message: "[volumes]: state_dir must be absolute and scrypt_n within 10..=28".into(),
            });
        }
        if !file.volumes.import_limits_in_bounds() {
            return Err(ConfigError::Parse {
                path,
                message: "[volumes]: import_* caps must be positive and at most the archive format's defaults".into(),
            });
        }
        if file.tpm.helper.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(ConfigError::Parse { path, message: "[tpm]: helper must be an absolute path".into() });
        }
        if file.tpm.helper.is_none() {
            file.tpm.helper =
                std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join(crate::tpm_helper::PROGRAM)));
        }
        let pick = |flag: &Option<PathBuf>, file: &Option<PathBuf>, default: &str| {
            flag.clone().or_else(|| file.clone()).unwrap_or_else(|| Path::new(default).to_path_buf())
        };
        Ok(Config {
            socket: pick(&args.socket, &file.socket, paths::BROKER_SOCKET),
            socket_group: args.socket_group.clone().or_else(|| file.socket_group.clone()),
            policy: pick(&args.policy, &file.policy, paths::BROKER_POLICY),
            audit_log: pick(&args.audit_log, &file.audit_log, paths::AUDIT_LOG),
            audit_group: args.audit_group.clone().or_else(|| file.audit_group.clone()),
            audit_max_bytes: args.audit_max_bytes.or(file.audit_max_bytes).unwrap_or(64 << 20),
            audit_keep: file.audit_keep.unwrap_or(10),
            audit_preallocate: file.audit_preallocate.unwrap_or(true),
            max_connections: file.max_connections.unwrap_or(4096),
            file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        Args::parse_from(args.iter().map(std::ffi::OsString::from))
    }

    #[test]
    fn flags_parse_with_space_or_equals_and_errors_name_the_argument() {
        let want = Args {
            socket: Some("/run/x.sock".into()),
            socket_group: Some("piccolo-broker".into()),
            audit_max_bytes: Some(4096),
            check_policy: Some("p.toml".into()),
            ..Default::default()
        };
        let got = parse(&[
            "--socket",
            "/run/x.sock",
            "--socket-group=piccolo-broker",
            "--audit-max-bytes=4096",
            "--check-policy",
            "p.toml",
        ]);
        assert_eq!(got, Ok(Command::Run(want)));
        assert_eq!(parse(&[]), Ok(Command::Run(Args::default())));
        assert_eq!(parse(&["--policy", "a", "-h"]), Ok(Command::Help));
        assert_eq!(parse(&["-V"]), Ok(Command::Version));
        assert_eq!(parse(&["--sockt", "x"]), Err("unknown argument \"--sockt\" (see --help)".into()));
        assert_eq!(parse(&["--policy"]), Err("--policy needs a value (see --help)".into()));
        assert_eq!(parse(&["--policy=a", "--policy", "b"]), Err("--policy given more than once".into()));
        assert_eq!(parse(&["--audit-max-bytes", "1k"]), Err("--audit-max-bytes: \"1k\" is not a byte count".into()));
        assert_eq!(parse(&["--help=x"]), Err("unknown argument \"--help=x\" (see --help)".into()));
    }

    #[test]
    fn import_caps_default_to_the_format_and_may_only_shrink() {
        let mut v = VolumesConfig::default();
        assert!(v.import_limits_in_bounds());
        assert_eq!(v.import_limits(), import_limit_bounds());
        v.import_max_total_bytes = 1 << 30;
        assert!(v.import_limits_in_bounds());
        v.import_max_file_bytes = import_limit_bounds().max_file_bytes + 1;
        assert!(!v.import_limits_in_bounds());
        let v = VolumesConfig { import_max_entries: 0, ..Default::default() };
        assert!(!v.import_limits_in_bounds());
        let v: FileConfig = toml::from_str("[volumes]\nimport_max_manifest_bytes = 100\n").unwrap();
        assert!(!v.volumes.import_limits_in_bounds());
    }
}
