//! Test support for the in-process tests: actors that stand in for a registry, a
//! heartbeat, a bus or a connection by collecting what they are sent, and the default
//! settings.

use crate::settings::Settings;
use actix::dev::{MessageResponse, OneshotSender};
use actix::prelude::*;
use std::marker::PhantomData;

/// Collects every `M` it receives until asked for them with [`Take`].
pub struct Collector<M> {
    received: Vec<M>,
}

impl<M: Unpin + 'static> Collector<M> {
    /// Starts a collector on the current arbiter.
    pub fn start_new() -> Addr<Self> {
        Self {
            received: Vec::new(),
        }
        .start()
    }
}

impl<M: Unpin + 'static> Actor for Collector<M> {
    type Context = Context<Self>;
}

impl<M> Handler<M> for Collector<M>
where
    M: Message<Result = ()> + Unpin + 'static,
{
    type Result = ();

    fn handle(&mut self, msg: M, _ctx: &mut Self::Context) {
        self.received.push(msg);
    }
}

/// Takes what a [`Collector`] received so far. Messages sent to it before this one are
/// included (a mailbox is FIFO).
pub struct Take<M>(PhantomData<M>);

impl<M> Take<M> {
    /// The request.
    pub fn all() -> Self {
        Self(PhantomData)
    }
}

impl<M: 'static> Message for Take<M> {
    type Result = Taken<M>;
}

/// What [`Take`] returns.
pub struct Taken<M>(pub Vec<M>);

impl<A: Actor, M: 'static> MessageResponse<A, Take<M>> for Taken<M> {
    fn handle(self, _ctx: &mut A::Context, tx: Option<OneshotSender<Taken<M>>>) {
        if let Some(tx) = tx {
            let _ = tx.send(self);
        }
    }
}

impl<M> Handler<Take<M>> for Collector<M>
where
    M: Unpin + 'static,
{
    type Result = Taken<M>;

    fn handle(&mut self, _msg: Take<M>, _ctx: &mut Self::Context) -> Taken<M> {
        Taken(std::mem::take(&mut self.received))
    }
}

/// Takes what `collector` received so far.
pub async fn take<M>(collector: &Addr<Collector<M>>) -> Vec<M>
where
    M: Message<Result = ()> + Unpin + Send + 'static,
{
    collector
        .send(Take::all())
        .await
        .expect("the collector is alive")
        .0
}

/// The settings of `config/default.toml`, the server's embedded defaults.
pub fn default_settings() -> Settings {
    config::Config::builder()
        .add_source(config::File::from_str(
            include_str!("../../config/default.toml"),
            config::FileFormat::Toml,
        ))
        .build()
        .and_then(|c| c.try_deserialize())
        .expect("config/default.toml is valid")
}

/// The JSON a text frame for an agent carries.
pub fn json_of(frame: &crate::outbound::OutFrame) -> serde_json::Value {
    use actix_codec::Decoder;
    use actix_http::ws::{Codec, Frame};
    let mut buf = bytes::BytesMut::from(&frame.0[..]);
    match Codec::new()
        .max_size(1 << 24)
        .client_mode()
        .decode(&mut buf)
    {
        Ok(Some(Frame::Text(text))) => serde_json::from_slice(&text).expect("JSON text"),
        other => panic!("not a text frame: {other:?}"),
    }
}
