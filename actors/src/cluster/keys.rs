//! The Redis keys of a cluster, all under `cluster.prefix`.
//!
//! The keys of one agent share the hash tag `{<agent id>}` and the keys of one member
//! share `{<member id>}`, so every script touches one hash slot and the layout also
//! works on Redis Cluster.

/// Key names of one cluster (one `cluster.prefix`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// Hash of one agent id: `inc` (its last incarnation, kept when it leaves), and
    /// while it is held `node` (the holding member), `session`, `seq`, `meta`.
    pub fn agent(&self, agent_id: &str) -> String {
        format!("{}:agent:{{{agent_id}}}", self.prefix)
    }

    /// A member's lease: its description (JSON), expiring after `cluster.node_lease`.
    pub fn lease(&self, member: &str) -> String {
        format!("{}:lease:{{{member}}}", self.prefix)
    }

    /// The ids a member holds (or was about to hold): what its reaper ends.
    pub fn held(&self, member: &str) -> String {
        format!("{}:held:{{{member}}}", self.prefix)
    }

    /// Taken by the one survivor that ends a lost member's agents.
    pub fn reaping(&self, member: &str) -> String {
        format!("{}:reaping:{{{member}}}", self.prefix)
    }

    /// Hash member id → description of every member that joined and was not yet
    /// reaped (live or lost).
    pub fn members(&self) -> String {
        format!("{}:members", self.prefix)
    }

    /// Pub/sub channel of the messages for one member's agents.
    pub fn inbox(&self, member: &str) -> String {
        format!("{}:to:{member}", self.prefix)
    }

    /// Pub/sub channel of instruction notices: work waiting for an agent or a
    /// capability, announced to every node.
    pub fn work(&self) -> String {
        format!("{}:work", self.prefix)
    }

    /// Pub/sub channel of broadcasts.
    pub fn broadcasts(&self) -> String {
        format!("{}:broadcast", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keys_of_one_agent_or_one_member_share_a_hash_tag() {
        let keys = Keys::new("tether");
        assert_eq!(keys.agent("alice"), "tether:agent:{alice}");
        assert_eq!(keys.lease("n1"), "tether:lease:{n1}");
        assert_eq!(keys.held("n1"), "tether:held:{n1}");
        assert_eq!(keys.reaping("n1"), "tether:reaping:{n1}");
    }
}
