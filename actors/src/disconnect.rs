//! Why and how a connection ends: the close code sent to the agent and the `reason` of
//! `agent.disconnected`, as one value (PROTOCOL.md §7), after centrifuge's
//! `disconnect.go`.
//!
//! Every place that ends a connection names one of the [`Disconnect`] constants, so a
//! code and its reason can never disagree.

/// Why an incarnation ended: the `reason` of `agent.disconnected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// The agent closed its socket (or the socket dropped).
    ClientClosed,
    /// The agent sent `unregister_agent`.
    Unregistered,
    /// The heartbeat declared it stale.
    Stale,
    /// A takeover replaced it.
    Replaced,
    /// The server shut down.
    Shutdown,
    /// An administrator removed it.
    Admin,
    /// Its outbound queue overflowed.
    SlowConsumer,
    /// It broke the protocol (oversized frame, repeated invalid frames).
    ProtocolError,
    /// Its connection failed (I/O error, internal fault).
    Error,
    /// Its node left the cluster (lease lost): the node closed it 4009, or a surviving
    /// node ended it after the node was lost.
    NodeLost,
}

impl EndReason {
    /// The `reason` string of `agent.disconnected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::Unregistered => "unregistered",
            Self::Stale => "stale",
            Self::Replaced => "replaced",
            Self::Shutdown => "shutdown",
            Self::Admin => "admin",
            Self::SlowConsumer => "slow_consumer",
            Self::ProtocolError => "protocol_error",
            Self::Error => "error",
            Self::NodeLost => "node_lost",
        }
    }
}

/// How a connection ends: the WebSocket close code and the reason published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnect {
    /// The close code sent to the agent.
    pub code: u16,
    /// The reason reported in `agent.disconnected` (and sent as the close reason).
    pub reason: EndReason,
}

impl Disconnect {
    const fn new(code: u16, reason: EndReason) -> Self {
        Self { code, reason }
    }

    /// 1000: the agent closed the socket.
    pub const CLIENT_CLOSED: Self = Self::new(1000, EndReason::ClientClosed);
    /// 1000: the agent sent `unregister_agent`.
    pub const UNREGISTERED: Self = Self::new(1000, EndReason::Unregistered);
    /// 1000: an administrator removed the agent.
    pub const ADMIN: Self = Self::new(1000, EndReason::Admin);
    /// 1001: the server is shutting down.
    pub const SHUTDOWN: Self = Self::new(1001, EndReason::Shutdown);
    /// 1002: the WebSocket framing was broken.
    pub const BAD_FRAMING: Self = Self::new(1002, EndReason::ProtocolError);
    /// 1006: the transport failed without a close frame (crash, reset, cut cable).
    pub const CONNECTION_LOST: Self = Self::new(1006, EndReason::ClientClosed);
    /// 1007: a text message that is not UTF-8.
    pub const INVALID_PAYLOAD: Self = Self::new(1007, EndReason::ProtocolError);
    /// 1008: too many invalid frames in a row.
    pub const POLICY_VIOLATION: Self = Self::new(1008, EndReason::ProtocolError);
    /// 1009: a frame or message over `limits.max_frame_bytes`.
    pub const MESSAGE_TOO_BIG: Self = Self::new(1009, EndReason::ProtocolError);
    /// 1011: the connection failed inside the server.
    pub const INTERNAL_ERROR: Self = Self::new(1011, EndReason::Error);
    /// 1013: the network is full; try again later.
    pub const SERVER_FULL: Self = Self::new(1013, EndReason::ProtocolError);
    /// 4001: another connection took over the agent id.
    pub const REPLACED: Self = Self::new(4001, EndReason::Replaced);
    /// 4002: the heartbeat declared the agent stale.
    pub const STALE: Self = Self::new(4002, EndReason::Stale);
    /// 4003: the agent does not read fast enough.
    pub const SLOW_CONSUMER: Self = Self::new(4003, EndReason::SlowConsumer);
    /// 4008: the socket did not register within `network.registration_timeout`.
    pub const REGISTRATION_TIMEOUT: Self = Self::new(4008, EndReason::ProtocolError);
    /// 4009: this node lost its cluster lease; the agent reconnects (its end is
    /// published by the node that noticed the loss).
    pub const NODE_LOST: Self = Self::new(4009, EndReason::NodeLost);

    /// Whether the frames already queued are written before the close frame: not for a
    /// slow consumer, whose backlog is the problem.
    pub fn drains_queue(self) -> bool {
        self.reason != EndReason::SlowConsumer
    }
}
