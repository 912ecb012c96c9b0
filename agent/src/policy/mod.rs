//! Policy evaluation for inbound connections: which mTLS mode a workload port requires
//! (PeerAuthentication) and whether a connection is authorized (AuthorizationPolicy, L4 subset).
//!
//! The policies themselves are plain data in MeshState ([`crate::state::policy`]); this module
//! adds the questions the proxy asks on every inbound connection:
//!
//! - [`Policies::mtls_mode`](crate::state::policy::Policies::mtls_mode): the mode for a
//!   workload port, with Istio's precedence.
//! - [`Policies::authorize`](crate::state::policy::Policies::authorize): allow or deny, and
//!   which policy decided.
//! - [`PolicyNotices`]: logs once per policy what the node proxy does not enforce.
pub mod authz;
pub mod mtls;
pub mod notices;

use std::{fmt, net::IpAddr};

use serde::Serialize;

pub use crate::state::policy::{MtlsMode, Policies};
use crate::state::{Identity, Workload};
pub use notices::PolicyNotices;

/// What the inbound side knows about a connection when it authorizes it.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionInfo<'a> {
    /// The peer's verified SPIFFE identity; `None` for plaintext.
    pub source_identity: Option<&'a Identity>,
    /// The client's address (the source pod's, preserved through HBONE).
    pub source_ip: IpAddr,
    /// The workload connected to.
    pub destination: &'a Workload,
    /// The address dialled on it.
    pub destination_ip: IpAddr,
    /// The workload port dialled.
    pub destination_port: u16,
    /// The original client (`remoteIpBlocks`, `remote.ip`), as a gateway derives it from
    /// `X-Forwarded-For`; `None` at the node proxy, which cannot know it. A term on it then
    /// never matches in an ALLOW policy and is left out of a DENY policy's match, as Istio's
    /// node proxy treats attributes it cannot see.
    pub remote_ip: Option<IpAddr>,
}

/// The outcome of [`Policies::authorize`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "decision")]
pub enum Decision {
    Allow,
    Deny {
        /// `namespace/name` of the deciding policy (for [`DenyReason::NoAllowRuleMatched`],
        /// the first ALLOW policy that selects the workload).
        policy: String,
        reason: DenyReason,
    },
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Why a connection was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// A rule of a DENY policy matched.
    DenyRuleMatched,
    /// ALLOW policies select the workload and none of their rules matched.
    NoAllowRuleMatched,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow => f.write_str("allowed"),
            Decision::Deny {
                policy,
                reason: DenyReason::DenyRuleMatched,
            } => write!(f, "denied by DENY policy {policy}"),
            Decision::Deny {
                policy,
                reason: DenyReason::NoAllowRuleMatched,
            } => write!(
                f,
                "denied: no rule of the ALLOW policies selecting the workload matched (first: {policy})"
            ),
        }
    }
}

#[cfg(test)]
mod tests;
