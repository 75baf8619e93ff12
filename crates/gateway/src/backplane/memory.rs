//! The in-process backplane of a single node: publishing is delivering to the local hub.

use super::{Backplane, BackplaneError, PublishAck};
use crate::connection::frame::Frame;
use crate::hub::Hub;
use async_trait::async_trait;
use gateway_protocol::ChannelName;
use parking_lot::Mutex;
use std::sync::Arc;

/// Delivers every publish straight to the local hub.
pub struct MemoryBackplane {
    hub: Arc<Hub>,
    /// One lock per hub stripe, held while a message fans out, so concurrent publishers to one
    /// channel are seen in the same order by every subscriber (Redis gives that order for free).
    order: Box<[Mutex<()>]>,
}

impl MemoryBackplane {
    /// A backplane delivering into `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub, order: (0..64).map(|_| Mutex::new(())).collect() }
    }
}

#[async_trait]
impl Backplane for MemoryBackplane {
    fn publish(&self, channel: &ChannelName, message: String) -> PublishAck {
        let frame = Frame::text(&message);
        let stripe = self.hub.stripe(channel.as_str()) % self.order.len();
        let _in_order = self.order[stripe].lock();
        self.hub.deliver(channel.as_str(), &frame);
        PublishAck::Ready(Some(Ok(())))
    }

    async fn subscribe(&self, _channel: &ChannelName) -> Result<(), BackplaneError> {
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &ChannelName) -> Result<(), BackplaneError> {
        Ok(())
    }

    fn is_up(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
