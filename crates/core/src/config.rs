//! The configuration that wires resources, mappings, correlation, reactions and
//! object templates. Plain data with serde; [`Config::validate`] checks it whole.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::CoreError;
use crate::mapping::Template;
use crate::situation::{Reaction, Situation};

/// The configuration schema version this build reads.
pub const CONFIG_VERSION: u32 = 1;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Configuration schema version; this build reads 1.
    pub version: u32,
    pub nats: NatsConfig,
    pub idm: IdmConfig,
    #[serde(default)]
    pub resources: Vec<ResourceConfig>,
    #[serde(default)]
    pub templates: Vec<ObjectTemplate>,
    /// Sync agreements by name: the authority under which source resources
    /// write to the IDM. Each is created in the IDM with `idsync sync create`.
    #[serde(default)]
    pub agreements: BTreeMap<String, AgreementConfig>,
    #[serde(default)]
    pub provisioning: ProvisioningConfig,
    #[serde(default)]
    pub workers: WorkersConfig,
}

/// How the correlator, the applier and the provisioner take their messages.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    /// Messages each replica of the correlator and the applier handles at
    /// once (1–256, default 1). One keeps Kanidm's halt exact: the
    /// correlator publishes decisions in the order of the changes and the
    /// applier applies them in that order, so nothing after the failing
    /// entry is applied, and the deletion guard lets exactly the first
    /// deletions through. Above one (or with several replicas) decisions may
    /// overtake each other, and the few in hand when an entry halts the
    /// agreement may still be applied; raise it for a large first import
    /// under `on_error = "quarantine"`.
    #[serde(default = "default_inbound_concurrency")]
    pub inbound_concurrency: u32,
    /// Messages each provisioner replica handles at once (1–256, default
    /// 16). Order never matters there (the provisioner is level-triggered
    /// and its commits conditional), so this is what N replicas would do,
    /// in one process: it keeps the IDM and LDAP round trips of several
    /// users in flight.
    #[serde(default = "default_provisioner_concurrency")]
    pub provisioner_concurrency: u32,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            inbound_concurrency: default_inbound_concurrency(),
            provisioner_concurrency: default_provisioner_concurrency(),
        }
    }
}

fn default_inbound_concurrency() -> u32 {
    1
}

fn default_provisioner_concurrency() -> u32 {
    16
}

/// How the provisioner deals with targets that refuse or cannot be reached.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningConfig {
    /// Attempts at a user's accounts before the operation is parked with its
    /// reason (`idsync provisioning parked | retry | drop`). Retries back off
    /// exponentially, with jitter, from 200 ms to 30 s.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u64,
}

impl Default for ProvisioningConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
        }
    }
}

fn default_max_attempts() -> u64 {
    20
}

/// A sync agreement as the services run it. The IDM holds the agreement
/// itself (its tokens, yielded attributes, status); this says how to use it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgreementConfig {
    /// File holding the agreement's sync token (`idsync sync generate-token`).
    pub token_file: Option<String>,
    /// Environment variable holding the agreement's sync token.
    pub token_env: Option<String>,
    /// What a conflict or import error does to the agreement.
    #[serde(default)]
    pub on_error: OnError,
    /// Cron expression (UTC, `minute hour day month weekday`): when the
    /// detector polls the agreement's resources that have no live sync.
    pub schedule: Option<String>,
    /// Where the IDM answers the agreement's status in one word (`Ok`, `Err`
    /// or `Unknown`) to anyone who connects, for example `127.0.0.1:9301`.
    pub status_bind: Option<String>,
    /// Let the `link` reaction take over native IDM entries that correlation
    /// finds (midPoint's migration: users made in the IDM before their
    /// accounts appear). Off, an agreement writes only what it created
    /// (Kanidm's rule), and linking a native entry is a conflict.
    #[serde(default)]
    pub adopt_native: bool,
    /// Source entry UUIDs that this agreement skips.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Source entry UUID → the name its focus gets instead of the mapped one.
    #[serde(default)]
    pub map_name: BTreeMap<String, String>,
    /// Source entry UUID → the id the focus created for it gets.
    #[serde(default)]
    pub map_uuid: BTreeMap<String, String>,
}

/// Kanidm's behaviour or midPoint's: stop the agreement at the first failure,
/// or park the failing entry and go on.
#[derive(
    Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop at the first conflict or import error; nothing after it is
    /// applied until the cause is fixed and `idsync sync retry` is run.
    #[default]
    Halt,
    /// Park the failing entry in the dead-letter stream; the rest go on.
    Quarantine,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// For example `nats://127.0.0.1:4222`.
    pub url: String,
    /// How long change events, decisions and focus changes stay in JetStream
    /// for replay and debugging (default 7); parked messages never age out.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
}

fn default_retention_days() -> u32 {
    7
}

impl NatsConfig {
    /// The streams' retention.
    pub fn retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.retention_days) * 86_400)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdmConfig {
    /// Where services reach the IDM's gRPC API, for example `http://127.0.0.1:50051`.
    pub url: String,
    /// Where the IDM service listens.
    #[serde(default = "default_idm_listen")]
    pub listen: String,
    /// Where the IDM keeps its state: `embedded` (a redb file in
    /// `data_dir`, for one IDM process) or `postgres` (a PostgreSQL database
    /// that several IDM replicas share; give its URL with
    /// `postgres_url_file` or `postgres_url_env`).
    #[serde(default)]
    pub store: StoreKind,
    /// Directory of the embedded store.
    #[serde(default = "default_idm_data_dir")]
    pub data_dir: String,
    /// Memory the embedded store may keep as its page cache, in MiB
    /// (redb's own default is a whole GiB). Reads beyond it come from the
    /// operating system's file cache.
    #[serde(default = "default_idm_cache_mib")]
    pub cache_mib: u32,
    /// File holding the PostgreSQL URL, for example
    /// `postgresql://idsync:secret@db:5432/idsync` (trailing newline
    /// ignored). The URL holds a password: it is never logged.
    pub postgres_url_file: Option<String>,
    /// Environment variable holding the PostgreSQL URL.
    pub postgres_url_env: Option<String>,
    /// File holding the administrator credential: the IDM accepts it for
    /// administrative calls, the CLI and the provisioner present it.
    pub admin_token_file: Option<String>,
    /// Environment variable holding the administrator credential.
    pub admin_token_env: Option<String>,
    /// Where the IDM serves agreement status as JSON over HTTP
    /// (`GET /status`, `GET /status/<agreement>`); off when unset.
    pub http_bind: Option<String>,
}

/// The IDM's store backend.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// redb in `idm.data_dir`: one IDM process holds it.
    #[default]
    Embedded,
    /// A PostgreSQL database, shared by every IDM replica.
    Postgres,
}

fn default_idm_listen() -> String {
    "127.0.0.1:50051".to_owned()
}

fn default_idm_cache_mib() -> u32 {
    64
}

fn default_idm_data_dir() -> String {
    "/var/lib/idsync/idm".to_owned()
}

/// One LDAP directory that idsync reads from, writes to, or both.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    pub name: String,
    /// The sync agreement under which this resource writes to the IDM;
    /// required when it has inbound mappings or groups.
    pub agreement: Option<String>,
    /// `ldap://host:port`.
    pub url: String,
    pub bind_dn: String,
    /// File holding the bind password (trailing newline ignored).
    pub bind_password_file: Option<String>,
    /// Environment variable holding the bind password.
    pub bind_password_env: Option<String>,
    pub base_dn: String,
    #[serde(default = "default_filter")]
    pub filter: String,
    /// The attribute that identifies entries: `entryUUID` (OpenLDAP, the
    /// default) or `nsUniqueId` (389 Directory Server).
    #[serde(default = "default_id_attribute")]
    pub id_attribute: String,
    /// Run live sync (RFC 4533 refreshAndPersist) on this resource.
    #[serde(default)]
    pub live_sync: bool,
    /// Cron expression (UTC): when the detector reconciles this resource in
    /// full (a resource under an agreement; `idsync reconcile` runs it on demand).
    pub reconcile_schedule: Option<String>,
    /// At most this many entries a second when reconciling, to spare the
    /// directory (scheduled runs, and `idsync reconcile` without `--rate`).
    pub reconcile_rate: Option<u32>,
    /// Object classes of accounts that idsync creates here.
    #[serde(default)]
    pub object_classes: Vec<String>,
    /// DN of accounts that idsync creates here, from focus attributes:
    /// `cn={name},o=Acme`.
    pub dn_template: Option<String>,
    /// Resource attribute → focus attribute.
    #[serde(default)]
    pub inbound: Vec<Mapping>,
    /// Focus attribute → resource attribute.
    #[serde(default)]
    pub outbound: Vec<Mapping>,
    /// Tried in order; the first rule that finds candidates decides.
    #[serde(default)]
    pub correlation: Vec<CorrelationRule>,
    #[serde(default)]
    pub reactions: BTreeMap<Situation, ReactionConfig>,
    /// Groups on this resource, synchronised to IDM groups.
    pub groups: Option<GroupsConfig>,
    /// Transport security (`ldaps://` URLs always use TLS).
    pub tls: Option<TlsConfig>,
    /// How an account is disabled here (the `inactivate_shadow` reaction).
    pub disable: Option<DisableConfig>,
    /// What happens to an account here when no assignment calls for it any
    /// more (or its user is disabled or deleted).
    #[serde(default)]
    pub deprovision: Deprovision,
    /// Stops mass deletions of this resource's entries before they reach
    /// the IDM (Entra Connect's export threshold, midPoint's policy thresholds).
    pub deletion_guard: Option<DeletionGuard>,
    /// How group membership that roles give is written on this resource.
    #[serde(default)]
    pub entitlements: Entitlements,
}

/// How an account is made a member of a group on a target resource: the
/// group's `attribute` gets the account's DN (`groupOfNames`' `member`, the
/// default), or the first value of one of its attributes (`value = "uid"`
/// for `posixGroup`'s `memberUid`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Entitlements {
    #[serde(default = "default_member_attribute")]
    pub attribute: String,
    /// `dn`, or the name of an account attribute.
    #[serde(default = "default_member_value")]
    pub value: String,
}

impl Default for Entitlements {
    fn default() -> Self {
        Self {
            attribute: default_member_attribute(),
            value: default_member_value(),
        }
    }
}

fn default_member_value() -> String {
    "dn".to_owned()
}

/// Deprovisioning policy of a target resource.
#[derive(
    Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Deprovision {
    /// Delete the account.
    #[default]
    Delete,
    /// Disable it (the resource's `disable` setting) and keep it, linked, so
    /// that a new assignment enables it again.
    Disable,
}

/// Thresholds on deletions within a sliding window. Crossing one halts the
/// resource's agreement before the deletion is applied, with the count, until
/// an operator accepts (`idsync sync accept-deletions`) or discards
/// (`idsync sync discard-deletions`) them. Counted by the IDM inside its
/// commits, so no number of workers makes it overshoot.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeletionGuard {
    /// At most this many deletions within the window.
    pub max_count: Option<u64>,
    /// At most this share (0.0 to 1.0) of the resource's entries within the window.
    pub max_share: Option<f64>,
    /// The window, in seconds (default 3,600).
    #[serde(default = "default_guard_window")]
    pub window_seconds: u64,
}

fn default_guard_window() -> u64 {
    3600
}

/// Disabling an account: set `attribute` to `value` (`nsAccountLock: TRUE` on
/// 389-ds, `pwdAccountLockedTime: 000001010000Z` with OpenLDAP's ppolicy).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DisableConfig {
    pub attribute: String,
    pub value: String,
}

/// Transport security for a resource.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Upgrade an `ldap://` connection with StartTLS before binding.
    #[serde(default)]
    pub starttls: bool,
    /// PEM file of the CA certificates to trust (default: the system's).
    pub ca_file: Option<String>,
}

/// Groups on a resource (`groupOfNames`): each becomes an IDM group named by
/// `name_source`, whose members are the focus objects that own the accounts
/// its `member_attribute` names by DN. A member whose account is not synced
/// yet is resolved when it arrives. Groups are found by name (unique per
/// kind); their reactions are fixed: unmatched → add_focus, unlinked → link,
/// linked → synchronize, deleted → delete_focus, disputed → nothing.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupsConfig {
    /// Subtree of the groups (default: the resource's `base_dn`).
    pub base_dn: Option<String>,
    #[serde(default = "default_group_filter")]
    pub filter: String,
    /// Attribute that names the group in the IDM.
    #[serde(default = "default_group_name")]
    pub name_source: String,
    /// Attribute that holds the members' DNs.
    #[serde(default = "default_member_attribute")]
    pub member_attribute: String,
    /// Attribute that holds the members' uids (`memberUid` of `posixGroup`).
    pub member_uid_attribute: Option<String>,
    /// Account attribute that `member_uid_attribute` values name.
    #[serde(default = "default_uid_source")]
    pub uid_source: String,
    /// Further group attributes → focus attributes.
    #[serde(default)]
    pub inbound: Vec<Mapping>,
}

fn default_group_filter() -> String {
    "(objectClass=groupOfNames)".to_owned()
}

fn default_group_name() -> String {
    "cn".to_owned()
}

fn default_uid_source() -> String {
    "uid".to_owned()
}

fn default_member_attribute() -> String {
    "member".to_owned()
}

impl ResourceConfig {
    /// Where the resource's groups live.
    pub fn groups_base(&self) -> Option<&str> {
        self.groups
            .as_ref()
            .map(|g| g.base_dn.as_deref().unwrap_or(&self.base_dn))
    }
}

fn default_id_attribute() -> String {
    "entryUUID".to_owned()
}

fn default_filter() -> String {
    "(objectClass=*)".to_owned()
}

/// midPoint's mapping strength.
#[derive(
    Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Strength {
    /// Only where the target has no value.
    Weak,
    /// When a source changed.
    #[default]
    Normal,
    /// Always; overrides other values.
    Strong,
}

/// A mapping: exactly one of `source` (as-is), `value` (a literal),
/// `template` (`"{givenName} {familyName}"`) or `expression` (CEL,
/// `"givenName + ' ' + familyName"`) gives the values for `target`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    pub source: Option<String>,
    pub value: Option<String>,
    pub template: Option<String>,
    pub expression: Option<String>,
    /// CEL condition: the mapping applies only while it is true.
    pub condition: Option<String>,
    pub target: String,
    #[serde(default)]
    pub strength: Strength,
    /// Which values of the target the mapping owns.
    #[serde(default)]
    pub range: Range,
}

/// The values of its target that a mapping owns, and may therefore remove.
#[derive(
    Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Range {
    /// All of them: the mapping's output replaces the target's values.
    #[default]
    All,
    /// Only those it produced: when its output changes, the values it
    /// produced before are removed and the new ones added; values from
    /// anywhere else stay (multi-valued attributes fed by several sources).
    Mapped,
}

/// One correlation rule: a query for focus objects whose attributes equal the
/// entry's. All `conditions` must hold. When the query finds several
/// candidates, the `confirmation` conditions (if any) narrow them down.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CorrelationRule {
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub confirmation: Vec<Condition>,
}

/// Focus attribute `focus_attribute` holds the first value of the entry's
/// `source` attribute, or of the CEL `expression` over the entry's attributes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub focus_attribute: String,
    pub source: Option<String>,
    pub expression: Option<String>,
}

impl Condition {
    /// Entry attributes the condition reads.
    pub fn sources(&self) -> Vec<String> {
        match (&self.source, &self.expression) {
            (Some(s), _) => vec![s.clone()],
            (None, Some(e)) => crate::expression::compiled(e)
                .map(|e| e.variables().to_vec())
                .unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }

    fn check(&self) -> Result<(), String> {
        match (&self.source, &self.expression) {
            (Some(_), None) => Ok(()),
            (None, Some(e)) => crate::expression::compiled(e)
                .map(drop)
                .map_err(|reason| format!("expression {e:?} {reason}")),
            _ => Err("set exactly one of source or expression".into()),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReactionConfig {
    pub action: Reaction,
    /// Object template applied to the focus, by name.
    pub template: Option<String>,
}

/// midPoint's object template: mappings evaluated on the focus itself, and
/// assignments given to every focus it is applied to.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ObjectTemplate {
    pub name: String,
    #[serde(default)]
    pub mappings: Vec<Mapping>,
    /// Resources on which every focus gets an account.
    #[serde(default)]
    pub assignments: Vec<String>,
    /// Roles (by name, managed with `idsync roles`) every focus is assigned.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// Whether `name` can name a role: not empty, no whitespace or control
/// characters at either end.
///
/// # Errors
/// What is wrong with the name.
pub fn check_role_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a role name cannot be empty".into());
    }
    if name.trim() != name || name.chars().any(char::is_control) {
        return Err(format!(
            "role name {name:?} has whitespace at an end or a control character"
        ));
    }
    Ok(())
}

impl Config {
    /// The JSON Schema of the configuration, from these types and their docs.
    pub fn json_schema() -> String {
        let schema = schemars::schema_for!(Config);
        serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n"
    }

    pub fn resource(&self, name: &str) -> Result<&ResourceConfig, CoreError> {
        self.resources
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| CoreError::UnknownResource {
                resource: name.to_owned(),
            })
    }

    /// The agreement that resource `name` writes under, if any.
    pub fn agreement_of(&self, resource: &str) -> Option<&str> {
        self.resources
            .iter()
            .find(|r| r.name == resource)
            .and_then(|r| r.agreement.as_deref())
    }

    /// The agreement resource `resource` writes under, with its settings.
    pub fn agreement_for(&self, resource: &str) -> Option<(&str, &AgreementConfig)> {
        let name = self.agreement_of(resource)?;
        self.agreements.get(name).map(|a| (name, a))
    }

    /// Whether the agreement of `resource` skips entry `entry_uuid`.
    pub fn is_excluded(&self, resource: &str, entry_uuid: &str) -> bool {
        self.agreement_for(resource)
            .is_some_and(|(_, a)| a.exclude.iter().any(|u| u.eq_ignore_ascii_case(entry_uuid)))
    }

    /// The name the agreement of `resource` gives entry `entry_uuid`'s focus, if remapped.
    pub fn mapped_name(&self, resource: &str, entry_uuid: &str) -> Option<&str> {
        self.agreement_for(resource)
            .and_then(|(_, a)| a.map_name.get(entry_uuid))
            .map(String::as_str)
    }

    /// The focus id the agreement of `resource` gives entry `entry_uuid`, if remapped.
    pub fn mapped_id(&self, resource: &str, entry_uuid: &str) -> Option<&str> {
        self.agreement_for(resource)
            .and_then(|(_, a)| a.map_uuid.get(entry_uuid))
            .map(String::as_str)
    }

    /// Resources that write under agreement `name`.
    pub fn resources_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ResourceConfig> {
        self.resources
            .iter()
            .filter(move |r| r.agreement.as_deref() == Some(name))
    }

    pub fn template(&self, name: &str) -> Option<&ObjectTemplate> {
        self.templates.iter().find(|t| t.name == name)
    }

    /// Checks the whole configuration and returns every problem found, each
    /// with the path of the field at fault.
    pub fn validate(&self) -> Vec<CoreError> {
        let mut errors = Vec::new();
        let mut err =
            |path: String, reason: String| errors.push(CoreError::Config { path, reason });
        if self.version != CONFIG_VERSION {
            err(
                "version".into(),
                format!(
                    "is {}, this build reads version {CONFIG_VERSION}",
                    self.version
                ),
            );
        }
        let resource_names: BTreeSet<&str> =
            self.resources.iter().map(|r| r.name.as_str()).collect();
        let template_names: BTreeSet<&str> =
            self.templates.iter().map(|t| t.name.as_str()).collect();
        if resource_names.len() != self.resources.len() {
            err(
                "resources".into(),
                "two resources have the same name".into(),
            );
        }
        if template_names.len() != self.templates.len() {
            err(
                "templates".into(),
                "two templates have the same name".into(),
            );
        }
        for (i, r) in self.resources.iter().enumerate() {
            let at = format!("resources[{i}] ({})", r.name);
            if !valid_name(&r.name) {
                err(
                    format!("{at}.name"),
                    "must be letters, digits, '-' or '_' (it names NATS subjects)".into(),
                );
            }
            if !r.url.starts_with("ldap://") && !r.url.starts_with("ldaps://") {
                err(
                    format!("{at}.url"),
                    format!("{:?} is not an ldap:// URL", r.url),
                );
            }
            if r.url.starts_with("ldaps://") && r.tls.as_ref().is_some_and(|t| t.starttls) {
                err(
                    format!("{at}.tls.starttls"),
                    "an ldaps:// URL is TLS from the start; StartTLS is for ldap:// URLs".into(),
                );
            }
            if r.deprovision == Deprovision::Disable && r.disable.is_none() {
                err(
                    format!("{at}.deprovision"),
                    "\"disable\" needs the resource's `disable` setting (which attribute and value disable an account)".into(),
                );
            }
            if let Some(expr) = &r.reconcile_schedule {
                if let Err(e) = crate::schedule::Schedule::parse(expr) {
                    err(format!("{at}.reconcile_schedule"), e.to_string());
                }
                if r.agreement.is_none() {
                    err(
                        format!("{at}.reconcile_schedule"),
                        "the detector reconciles resources under an agreement; run `idsync reconcile` for others".into(),
                    );
                }
            }
            if let Some(g) = &r.deletion_guard {
                if g.max_count.is_none() && g.max_share.is_none() {
                    err(
                        format!("{at}.deletion_guard"),
                        "set max_count, max_share or both".into(),
                    );
                }
                if g.max_share.is_some_and(|s| !(0.0..=1.0).contains(&s)) {
                    err(
                        format!("{at}.deletion_guard.max_share"),
                        "is a share of the resource's entries, from 0.0 to 1.0".into(),
                    );
                }
                if g.window_seconds == 0 {
                    err(
                        format!("{at}.deletion_guard.window_seconds"),
                        "must be at least 1".into(),
                    );
                }
            }
            let writes_inbound = !r.inbound.is_empty() || r.groups.is_some();
            match &r.agreement {
                Some(a) if !self.agreements.contains_key(a) => err(
                    format!("{at}.agreement"),
                    format!("names agreement {a:?}, which is not in [agreements]"),
                ),
                None if writes_inbound => err(
                    format!("{at}.agreement"),
                    "a resource with inbound mappings or groups writes to the IDM under a sync agreement; name one from [agreements]".into(),
                ),
                _ => {}
            }
            if r.bind_password_file.is_some() && r.bind_password_env.is_some() {
                err(
                    format!("{at}.bind_password_file"),
                    "set bind_password_file or bind_password_env, not both".into(),
                );
            }
            for (kind, mappings) in [("inbound", &r.inbound), ("outbound", &r.outbound)] {
                for (j, m) in mappings.iter().enumerate() {
                    if let Err(reason) = m.check() {
                        err(format!("{at}.{kind}[{j}]"), reason);
                    }
                }
            }
            if let Some(g) = &r.groups {
                for (j, m) in g.inbound.iter().enumerate() {
                    if let Err(reason) = m.check() {
                        err(format!("{at}.groups.inbound[{j}]"), reason);
                    }
                }
            }
            if !r.outbound.is_empty() {
                match &r.dn_template {
                    None => err(
                        format!("{at}.dn_template"),
                        "a resource with outbound mappings needs a dn_template".into(),
                    ),
                    Some(t) => {
                        if let Err(e) = Template::parse(t) {
                            err(format!("{at}.dn_template"), e.to_string());
                        }
                    }
                }
                if r.object_classes.is_empty() {
                    err(
                        format!("{at}.object_classes"),
                        "a resource with outbound mappings needs object_classes".into(),
                    );
                }
            }
            for (j, rule) in r.correlation.iter().enumerate() {
                if rule.conditions.is_empty() {
                    err(
                        format!("{at}.correlation[{j}].conditions"),
                        "a rule needs at least one condition".into(),
                    );
                }
                for (kind, list) in [
                    ("conditions", &rule.conditions),
                    ("confirmation", &rule.confirmation),
                ] {
                    for (k, c) in list.iter().enumerate() {
                        if let Err(reason) = c.check() {
                            err(format!("{at}.correlation[{j}].{kind}[{k}]"), reason);
                        }
                    }
                }
            }
            for (situation, reaction) in &r.reactions {
                if let Some(t) = &reaction.template
                    && !template_names.contains(t.as_str())
                {
                    err(
                        format!("{at}.reactions.{situation}.template"),
                        format!("names template {t:?}, which is not defined"),
                    );
                }
                if reaction.action == Reaction::InactivateShadow && r.disable.is_none() {
                    err(
                        format!("{at}.reactions.{situation}.action"),
                        "inactivate_shadow needs the resource's `disable` setting (which attribute and value disable an account)".into(),
                    );
                }
                if !reaction.action.fits(*situation) {
                    err(
                        format!("{at}.reactions.{situation}.action"),
                        format!(
                            "{} does not apply to situation {situation}",
                            reaction.action
                        ),
                    );
                }
            }
        }
        for (i, t) in self.templates.iter().enumerate() {
            let at = format!("templates[{i}] ({})", t.name);
            for (j, m) in t.mappings.iter().enumerate() {
                if let Err(reason) = m.check() {
                    err(format!("{at}.mappings[{j}]"), reason);
                }
            }
            for (j, a) in t.assignments.iter().enumerate() {
                if !resource_names.contains(a.as_str()) {
                    err(
                        format!("{at}.assignments[{j}]"),
                        format!("names resource {a:?}, which is not defined"),
                    );
                }
            }
            for (j, role) in t.roles.iter().enumerate() {
                if let Err(reason) = check_role_name(role) {
                    err(format!("{at}.roles[{j}]"), reason);
                }
            }
        }
        if self.nats.retention_days == 0 {
            err(
                "nats.retention_days".into(),
                "must be at least 1 (replay and restarts read from the streams)".into(),
            );
        }
        if !(1..=65_536).contains(&self.idm.cache_mib) {
            err(
                "idm.cache_mib".into(),
                "must be between 1 and 65536 (MiB)".into(),
            );
        }
        if self.provisioning.max_attempts == 0 {
            err(
                "provisioning.max_attempts".into(),
                "must be at least 1".into(),
            );
        }
        for (field, value) in [
            (
                "workers.inbound_concurrency",
                self.workers.inbound_concurrency,
            ),
            (
                "workers.provisioner_concurrency",
                self.workers.provisioner_concurrency,
            ),
        ] {
            if !(1..=256).contains(&value) {
                err(field.into(), "must be between 1 and 256".into());
            }
        }
        match (
            self.idm.store,
            &self.idm.postgres_url_file,
            &self.idm.postgres_url_env,
        ) {
            (StoreKind::Postgres, Some(_), Some(_)) => err(
                "idm.postgres_url_file".into(),
                "set postgres_url_file or postgres_url_env, not both".into(),
            ),
            (StoreKind::Postgres, None, None) => err(
                "idm.store".into(),
                "store = \"postgres\" needs the database's URL: set postgres_url_file or postgres_url_env".into(),
            ),
            (StoreKind::Embedded, Some(_), _) => err(
                "idm.postgres_url_file".into(),
                "only used with store = \"postgres\" (the embedded store lives in data_dir)"
                    .into(),
            ),
            (StoreKind::Embedded, _, Some(_)) => err(
                "idm.postgres_url_env".into(),
                "only used with store = \"postgres\" (the embedded store lives in data_dir)"
                    .into(),
            ),
            _ => {}
        }
        if self.idm.admin_token_file.is_some() && self.idm.admin_token_env.is_some() {
            err(
                "idm.admin_token_file".into(),
                "set admin_token_file or admin_token_env, not both".into(),
            );
        }
        let mut status_binds = BTreeSet::new();
        for (name, a) in &self.agreements {
            let at = format!("agreements.{name}");
            if !valid_name(name) {
                err(
                    at.clone(),
                    "an agreement's name must be letters, digits, '-' or '_' (it names NATS subjects)".into(),
                );
            }
            match (&a.token_file, &a.token_env) {
                (Some(_), Some(_)) => err(
                    format!("{at}.token_file"),
                    "set token_file or token_env, not both".into(),
                ),
                (None, None) => err(
                    at.clone(),
                    "needs the agreement's sync token: set token_file or token_env".into(),
                ),
                _ => {}
            }
            if let Some(expr) = &a.schedule
                && let Err(e) = crate::schedule::Schedule::parse(expr)
            {
                err(format!("{at}.schedule"), e.to_string());
            }
            if let Some(bind) = &a.status_bind {
                if bind.parse::<std::net::SocketAddr>().is_err() {
                    err(
                        format!("{at}.status_bind"),
                        format!("{bind:?} is not an address and port such as 127.0.0.1:9301"),
                    );
                } else if !status_binds.insert(bind.as_str()) {
                    err(
                        format!("{at}.status_bind"),
                        format!("{bind} is already another agreement's status_bind"),
                    );
                }
            }
            for (uuid, name) in &a.map_name {
                if name.trim().is_empty() {
                    err(format!("{at}.map_name.{uuid}"), "the name is empty".into());
                }
            }
            for (uuid, id) in &a.map_uuid {
                if !is_uuid(id) {
                    err(
                        format!("{at}.map_uuid.{uuid}"),
                        format!("{id:?} is not a UUID"),
                    );
                }
            }
            if let Some(uuid) = a.exclude.iter().find(|u| u.trim().is_empty()) {
                err(format!("{at}.exclude"), format!("{uuid:?} is empty"));
            }
        }
        errors
    }
}

/// `8-4-4-4-12` hexadecimal digits, as focus ids are written.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl Mapping {
    fn check(&self) -> Result<(), String> {
        let given = [&self.source, &self.value, &self.template, &self.expression]
            .iter()
            .filter(|x| x.is_some())
            .count();
        if given != 1 {
            return Err("exactly one of source, value, template or expression must be set".into());
        }
        if let Some(e) = &self.expression {
            crate::expression::compiled(e)
                .map_err(|reason| format!("expression {e:?} {reason}"))?;
        }
        if let Some(c) = &self.condition {
            crate::expression::compiled(c).map_err(|reason| format!("condition {c:?} {reason}"))?;
        }
        if self.target.is_empty() {
            return Err("target is empty".into());
        }
        if let Some(t) = &self.template {
            Template::parse(t).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Attributes this mapping reads, its condition's included.
    pub fn sources(&self) -> Vec<String> {
        let compiled = |e: &str| {
            crate::expression::compiled(e)
                .map(|e| e.variables().to_vec())
                .unwrap_or_default()
        };
        let mut out = if let Some(s) = &self.source {
            vec![s.clone()]
        } else if let Some(e) = &self.expression {
            compiled(e)
        } else {
            match self.template.as_deref().map(Template::parse) {
                Some(Ok(t)) => t.variables().map(str::to_owned).collect(),
                _ => Vec::new(),
            }
        };
        if let Some(c) = &self.condition {
            for v in compiled(c) {
                if !out.contains(&v) {
                    out.push(v);
                }
            }
        }
        out
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = include_str!("../../../deploy/local/idsync.toml");

    #[test]
    fn example_configuration_is_valid() {
        let cfg: Config = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(cfg.validate(), vec![]);
    }

    #[test]
    fn the_freeipa_example_is_valid() {
        let cfg: Config =
            toml::from_str(include_str!("../../../deploy/freeipa/idsync.toml")).unwrap();
        assert_eq!(cfg.validate(), vec![]);
        let ipa = cfg.resource("ipa").unwrap();
        assert_eq!(ipa.id_attribute, "nsUniqueId");
        assert_eq!(
            ipa.groups_base(),
            Some("cn=groups,cn=accounts,dc=example,dc=com")
        );
    }

    #[test]
    fn agreement_problems_are_named() {
        let errors_of = |change: &dyn Fn(&mut Config)| -> Vec<String> {
            let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
            change(&mut cfg);
            cfg.validate().iter().map(ToString::to_string).collect()
        };
        let one = |change: &dyn Fn(&mut Config), expected: &str| {
            let errors = errors_of(change);
            assert!(
                errors.len() == 1 && errors[0].contains(expected),
                "expected {expected:?}, got {errors:#?}"
            );
        };
        one(
            &|c| c.resources[0].agreement = None,
            "resources[0] (hr).agreement: a resource with inbound mappings or groups writes to the IDM under a sync agreement",
        );
        one(
            &|c| c.resources[0].agreement = Some("crm".into()),
            "names agreement \"crm\", which is not in [agreements]",
        );
        let hr = |c: &mut Config| c.agreements.get_mut("hr").unwrap().clone();
        let set = |f: fn(&mut AgreementConfig)| {
            move |c: &mut Config| {
                let mut a = hr(c);
                f(&mut a);
                c.agreements.insert("hr".into(), a);
            }
        };
        one(
            &set(|a| a.token_env = None),
            "agreements.hr: needs the agreement's sync token",
        );
        one(
            &set(|a| a.token_file = Some("/x".into())),
            "agreements.hr.token_file: set token_file or token_env, not both",
        );
        one(
            &set(|a| a.schedule = Some("61 * * * *".into())),
            "agreements.hr.schedule: cron expression \"61 * * * *\"",
        );
        one(
            &set(|a| a.status_bind = Some("localhost".into())),
            "agreements.hr.status_bind: \"localhost\" is not an address",
        );
        one(
            &set(|a| {
                a.map_uuid.insert("e1".into(), "not-a-uuid".into());
            }),
            "agreements.hr.map_uuid.e1: \"not-a-uuid\" is not a UUID",
        );
        one(
            &|c| {
                let mut a = hr(c);
                a.status_bind = None;
                c.agreements.insert("bad name".into(), a);
            },
            "agreements.bad name: an agreement's name must be letters",
        );
        one(
            &|c| c.idm.admin_token_file = Some("/x".into()),
            "idm.admin_token_file: set admin_token_file or admin_token_env, not both",
        );
        one(
            &|c| c.idm.store = StoreKind::Postgres,
            "idm.store: store = \"postgres\" needs the database's URL",
        );
        one(
            &|c| {
                c.idm.store = StoreKind::Postgres;
                c.idm.postgres_url_env = Some("X".into());
                c.idm.postgres_url_file = Some("/x".into());
            },
            "idm.postgres_url_file: set postgres_url_file or postgres_url_env, not both",
        );
        one(
            &|c| c.idm.postgres_url_env = Some("X".into()),
            "idm.postgres_url_env: only used with store = \"postgres\"",
        );
        let mut pg: Config = toml::from_str(EXAMPLE).unwrap();
        pg.idm.store = StoreKind::Postgres;
        pg.idm.postgres_url_env = Some("IDSYNC_PG_URL".into());
        assert!(pg.validate().is_empty(), "{:?}", pg.validate());
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
        cfg.templates[0].assignments.push("nowhere".into());
        cfg.resources[0].inbound[0].value = Some("x".into());
        cfg.resources[0]
            .reactions
            .get_mut(&Situation::Unmatched)
            .unwrap()
            .template = Some("missing".into());
        let errors: Vec<String> = cfg.validate().iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(
            errors
                .iter()
                .any(|e| e.contains("templates[0] (default-user).assignments[1]"))
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("resources[0] (hr).inbound[0]"))
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("reactions.unmatched.template"))
        );
    }

    #[test]
    fn published_schema_matches_the_types() {
        let published = include_str!("../../../docs/config.schema.json");
        assert!(
            published == Config::json_schema(),
            "docs/config.schema.json is out of date: run `cargo run -p idsync -- config schema > docs/config.schema.json`"
        );
    }

    #[test]
    fn every_field_is_in_the_reference() {
        let reference = include_str!("../../../docs/configuration.md");
        let schema: serde_json::Value = serde_json::from_str(&Config::json_schema()).unwrap();
        let mut fields = Vec::new();
        collect_properties(&schema, &mut fields);
        let missing: Vec<_> = fields
            .iter()
            .filter(|f| !reference.contains(&format!("| `{f}` |")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/configuration.md does not describe {missing:?}"
        );
    }

    fn collect_properties(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::Object(props)) = map.get("properties") {
                    out.extend(props.keys().cloned());
                }
                map.values().for_each(|v| collect_properties(v, out));
            }
            serde_json::Value::Array(items) => {
                items.iter().for_each(|v| collect_properties(v, out))
            }
            _ => {}
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = EXAMPLE.replace("[nats]", "[nats]\nurll = \"x\"");
        let err = toml::from_str::<Config>(&text).unwrap_err().to_string();
        assert!(err.contains("unknown field `urll`"), "{err}");
    }
}
