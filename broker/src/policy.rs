// SPDX-License-Identifier: Apache-2.0
//! The broker policy: which users and groups may call which RPC, with argument constraints.
//!
//! Default deny: an RPC no rule names is refused to everyone, root included. Names are
//! resolved to uids/gids when the policy is loaded; an unknown RPC, user, group or
//! constraint is an error that names its line, so a bad file never comes into force.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use piccolo_proto::Rpc;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::identity::Identity;

/// Why a policy file was rejected.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct PolicyError {
    /// The file being loaded.
    pub file: String,
    /// 1-based line of the offending item (0 when the whole file is at fault).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: Spanned<u32>,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    rpcs: Vec<Spanned<String>>,
    #[serde(default)]
    users: Vec<Spanned<String>>,
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    reason: Spanned<String>,
    // Argument constraints, one field per constraint key of the RPC table.
    volumes: Option<Spanned<Vec<String>>>,
    partitions: Option<Spanned<Vec<String>>>,
    disks: Option<Spanned<Vec<String>>>,
    efi_variables: Option<Spanned<Vec<String>>>,
    /// Users a `CreateVolume` of this rule may present the volume as (besides the caller).
    present_as: Option<Spanned<Vec<String>>>,
}

impl RawRule {
    /// The rule's constraints as (key, values); keys match `RpcSpec::constraint`.
    fn constraints(&self) -> impl Iterator<Item = (&'static str, &Spanned<Vec<String>>)> {
        [
            ("volumes", &self.volumes),
            ("partitions", &self.partitions),
            ("disks", &self.disks),
            ("efi_variables", &self.efi_variables),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    }
}

/// A value an argument may take: exact, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern(String);

impl Pattern {
    fn matches(&self, v: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => v.starts_with(prefix),
            None => self.0 == v,
        }
    }
}

/// One principal as written in the policy, resolved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Principal {
    /// `users = [...]`
    User(String, u32),
    /// `groups = [...]`
    Group(String, u32),
}

impl Principal {
    fn matches(&self, id: &Identity) -> bool {
        match self {
            Principal::User(_, uid) => id.uid == *uid,
            Principal::Group(_, gid) => id.gid == *gid || id.groups.iter().any(|(g, _)| g == gid),
        }
    }

    /// `user:NAME` or `group:NAME`.
    pub fn label(&self) -> String {
        match self {
            Principal::User(n, _) => format!("user:{n}"),
            Principal::Group(n, _) => format!("group:{n}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Grant {
    principals: Vec<Principal>,
    constraint: Option<Vec<Pattern>>,
    /// uids `present_as` names (CreateVolume only).
    present_as: Vec<u32>,
}

/// A loaded, validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    grants: BTreeMap<Rpc, Vec<Grant>>,
    sha256: String,
}

/// Resolves user and group names; the real one reads the system databases.
pub trait NameResolver {
    /// uid of a user name.
    fn uid(&self, name: &str) -> Option<u32>;
    /// gid of a group name.
    fn gid(&self, name: &str) -> Option<u32>;
}

/// Resolves names through NSS (`getpwnam`, `getgrnam`).
pub struct SystemNames;

impl NameResolver for SystemNames {
    fn uid(&self, name: &str) -> Option<u32> {
        nix::unistd::User::from_name(name).ok().flatten().map(|u| u.uid.as_raw())
    }
    fn gid(&self, name: &str) -> Option<u32> {
        nix::unistd::Group::from_name(name).ok().flatten().map(|g| g.gid.as_raw())
    }
}

impl Policy {
    /// Parses and validates `text` (from `file`, for messages).
    pub fn parse(file: &str, text: &str, names: &dyn NameResolver) -> Result<Policy, PolicyError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let err = |offset: Option<usize>, reason: String| PolicyError {
            file: file.to_owned(),
            line: offset.map_or(0, line_of),
            reason,
        };
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| err(e.span().map(|s| s.start), e.message().to_owned()))?;
        if *raw.version.get_ref() != 1 {
            return Err(err(
                Some(raw.version.span().start),
                format!("unsupported policy version {}", raw.version.get_ref()),
            ));
        }
        let mut grants: BTreeMap<Rpc, Vec<Grant>> = BTreeMap::new();
        for rule in &raw.rules {
            if rule.reason.get_ref().trim().is_empty() {
                return Err(err(Some(rule.reason.span().start), "every rule needs a reason".into()));
            }
            let mut principals = Vec::new();
            for u in &rule.users {
                let uid = names
                    .uid(u.get_ref())
                    .ok_or_else(|| err(Some(u.span().start), format!("unknown user {:?}", u.get_ref())))?;
                principals.push(Principal::User(u.get_ref().clone(), uid));
            }
            for g in &rule.groups {
                let gid = names
                    .gid(g.get_ref())
                    .ok_or_else(|| err(Some(g.span().start), format!("unknown group {:?}", g.get_ref())))?;
                principals.push(Principal::Group(g.get_ref().clone(), gid));
            }
            if principals.is_empty() {
                return Err(err(Some(rule.reason.span().start), "rule names no users or groups".into()));
            }
            let mut present_as = Vec::new();
            if let Some(users) = &rule.present_as {
                if !rule.rpcs.iter().any(|r| r.get_ref() == Rpc::CreateVolume.name()) {
                    return Err(err(Some(users.span().start), "`present_as` applies only to CreateVolume".into()));
                }
                for u in users.get_ref() {
                    let uid = names
                        .uid(u)
                        .ok_or_else(|| err(Some(users.span().start), format!("unknown user {u:?} in present_as")))?;
                    present_as.push(uid);
                }
            }
            let mut used_keys = BTreeSet::new();
            for name in &rule.rpcs {
                let rpc = Rpc::from_name(name.get_ref())
                    .ok_or_else(|| err(Some(name.span().start), format!("unknown RPC {:?}", name.get_ref())))?;
                let constraint = match rpc.spec().constraint {
                    Some(key) => {
                        let values = rule.constraints().find(|(k, _)| *k == key).map(|(_, v)| v).ok_or_else(|| {
                            err(
                                Some(name.span().start),
                                format!("{rpc} needs a `{key}` constraint in its rule (use [\"*\"] to allow any)"),
                            )
                        })?;
                        used_keys.insert(key);
                        if values.get_ref().is_empty() {
                            return Err(err(
                                Some(values.span().start),
                                format!("`{key}` is empty; remove {rpc} from the rule instead"),
                            ));
                        }
                        Some(values.get_ref().iter().map(|v| Pattern(v.clone())).collect())
                    }
                    None => None,
                };
                let present_as = if rpc == Rpc::CreateVolume { present_as.clone() } else { Vec::new() };
                grants.entry(rpc).or_default().push(Grant { principals: principals.clone(), constraint, present_as });
            }
            for (key, values) in rule.constraints() {
                if !used_keys.contains(key) {
                    return Err(err(
                        Some(values.span().start),
                        format!("constraint `{key}` applies to none of this rule's RPCs"),
                    ));
                }
            }
        }
        Ok(Policy { grants, sha256: hex::encode(Sha256::digest(text.as_bytes())) })
    }

    /// Whether `id` may call `rpc` with the constrained argument `arg` (if the RPC has one).
    pub fn allows(&self, id: &Identity, rpc: Rpc, arg: Option<&str>) -> bool {
        self.grants.get(&rpc).is_some_and(|grants| {
            grants.iter().any(|g| {
                g.principals.iter().any(|p| p.matches(id))
                    && match (&g.constraint, arg) {
                        (None, _) => true,
                        (Some(pats), Some(v)) => pats.iter().any(|p| p.matches(v)),
                        // A constrained RPC whose handler supplied no value is refused.
                        (Some(_), None) => false,
                    }
            })
        })
    }

    /// Whether `id` may create volume `volume_id` presented as user `uid`: its own uid, or
    /// one that the `present_as` of a rule granting it this CreateVolume names.
    pub fn allows_present_as(&self, id: &Identity, volume_id: &str, uid: u32) -> bool {
        self.grants.get(&Rpc::CreateVolume).is_some_and(|grants| {
            grants.iter().any(|g| {
                g.principals.iter().any(|p| p.matches(id))
                    && g.constraint.as_ref().is_none_or(|pats| pats.iter().any(|p| p.matches(volume_id)))
                    && (uid == id.uid || g.present_as.contains(&uid))
            })
        })
    }

    /// RPCs some rule lets `id` call (constraints not considered).
    pub fn allowed_rpcs(&self, id: &Identity) -> Vec<Rpc> {
        self.grants
            .iter()
            .filter(|(_, gs)| gs.iter().any(|g| g.principals.iter().any(|p| p.matches(id))))
            .map(|(r, _)| *r)
            .collect()
    }

    /// Lowercase hex SHA-256 of the file this policy was parsed from.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The effective table: one row per RPC in the table, one column per named principal.
    pub fn render_table(&self) -> String {
        let principals: BTreeSet<Principal> =
            self.grants.values().flatten().flat_map(|g| g.principals.iter().cloned()).collect();
        let cols: Vec<String> = principals.iter().map(Principal::label).collect();
        let width = Rpc::ALL.iter().map(|r| r.name().len()).max().unwrap_or(0);
        let mut out = format!("{:width$}", "RPC");
        for c in &cols {
            let _ = write!(out, "  {c}");
        }
        out.push('\n');
        for rpc in Rpc::ALL {
            let _ = write!(out, "{:width$}", rpc.name());
            for (p, c) in principals.iter().zip(&cols) {
                let cell = self.grants.get(rpc).map_or_else(String::new, |gs| {
                    let mut vals: Vec<String> = Vec::new();
                    let mut any = false;
                    for g in gs.iter().filter(|g| g.principals.contains(p)) {
                        any = true;
                        if let Some(pats) = &g.constraint {
                            vals.extend(pats.iter().map(|p| p.0.clone()));
                        }
                    }
                    match (any, vals.is_empty()) {
                        (false, _) => String::new(),
                        (true, true) => "yes".into(),
                        (true, false) => vals.join(","),
                    }
                });
                let cell = if cell.is_empty() { "-".to_string() } else { cell };
                let _ = write!(out, "  {cell:w$}", w = c.len());
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Names;
    impl NameResolver for Names {
        fn uid(&self, n: &str) -> Option<u32> {
            [("root", 0), ("piccolo-api", 901), ("piccolo-updater", 902)].iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
        }
        fn gid(&self, n: &str) -> Option<u32> {
            [("piccolo-broker", 800), ("wheel", 10)].iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
        }
    }

    fn id(uid: u32, gid: u32, groups: &[u32]) -> Identity {
        Identity {
            uid,
            gid,
            pid: None,
            user: None,
            groups: groups.iter().map(|g| (*g, String::new())).collect(),
            exe: None,
            unit: None,
        }
    }

    const GOOD: &str = r#"
version = 1

[[rule]]
rpcs = ["GetInfo", "WhoAmI"]
groups = ["piccolo-broker"]
reason = "any broker client"

[[rule]]
rpcs = ["WhoAmI"]
users = ["root"]
reason = "operators"
"#;

    #[test]
    fn default_deny_and_group_membership() {
        let p = Policy::parse("t", GOOD, &Names).unwrap();
        assert!(p.allows(&id(5, 800, &[]), Rpc::GetInfo, None));
        assert!(p.allows(&id(5, 5, &[800]), Rpc::GetInfo, None), "supplementary group");
        assert!(!p.allows(&id(5, 5, &[]), Rpc::GetInfo, None));
        assert!(!p.allows(&id(0, 0, &[]), Rpc::GetInfo, None), "root is not special");
        assert!(p.allows(&id(0, 0, &[]), Rpc::WhoAmI, None));
        assert_eq!(p.allowed_rpcs(&id(0, 0, &[])), vec![Rpc::WhoAmI]);
        assert!(p.render_table().contains("group:piccolo-broker"));
    }

    #[test]
    fn present_as_names_whom_a_create_may_present_a_volume_as() {
        let text = r#"
version = 1

[[rule]]
rpcs = ["CreateVolume", "MountVolume"]
users = ["piccolo-api"]
volumes = ["app-*"]
present_as = ["piccolo-updater"]
reason = "app volumes"

[[rule]]
rpcs = ["CreateVolume"]
users = ["piccolo-api"]
volumes = ["control"]
reason = "own volume"
"#;
        let p = Policy::parse("t", text, &Names).unwrap();
        let api = id(901, 901, &[]);
        assert!(p.allows_present_as(&api, "app-a", 902));
        assert!(p.allows_present_as(&api, "app-a", 901), "the caller itself");
        assert!(!p.allows_present_as(&api, "app-a", 0), "a user present_as does not name");
        assert!(!p.allows_present_as(&api, "control", 902), "the control rule names no present_as");
        assert!(!p.allows_present_as(&id(902, 902, &[]), "app-a", 902), "not a principal of the rule");
        let e = err_of(&text.replace("piccolo-updater\"]", "mallory\"]"));
        assert!(e.reason.contains("unknown user \"mallory\""), "{e}");
        let e = err_of(&text.replace("[\"CreateVolume\", \"MountVolume\"]", "[\"MountVolume\"]"));
        assert!(e.reason.contains("only to CreateVolume"), "{e}");
    }

    fn err_of(text: &str) -> PolicyError {
        Policy::parse("t", text, &Names).unwrap_err()
    }

    #[test]
    fn errors_name_the_line() {
        let e =
            err_of("version = 1\n[[rule]]\nrpcs = [\"GetInfo\", \"RunCommand\"]\nusers = [\"root\"]\nreason = \"x\"\n");
        assert_eq!((e.line, e.reason.as_str()), (3, "unknown RPC \"RunCommand\""));
        let e =
            err_of("version = 1\n[[rule]]\nrpcs = [\"GetInfo\"]\nusers = [\"root\",\n \"mallory\"]\nreason = \"x\"\n");
        assert_eq!((e.line, e.reason.as_str()), (5, "unknown user \"mallory\""));
        let e = err_of("version = 1\n[[rule]]\nrpcs = [\"GetInfo\"]\ngroups = [\"nogroup-x\"]\nreason = \"x\"\n");
        assert_eq!(e.line, 4);
        let e = err_of("version = 1\n[[rule]]\nrpcs = [\"GetInfo\"]\nusers = [\"root\"]\nreason = \"\"\n");
        assert!(e.reason.contains("reason"));
        let e = err_of(
            "version = 1\n[[rule]]\nrpcs = [\"GetInfo\"]\nusers = [\"root\"]\nreason = \"x\"\nvolumes = [\"a\"]\n",
        );
        assert_eq!((e.line, e.reason.contains("applies to none")), (6, true));
        let e = err_of("version = 2\n");
        assert_eq!(e.line, 1);
        let e = err_of("version = 1\n[[rule]]\nrpcs = [\"GetInfo\"\n");
        assert!(e.line >= 3, "{e}");
    }
}
