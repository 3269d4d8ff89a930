//! The bridge reconciler's netlink I/O: read the link and its addresses, apply one fix, and
//! subscribe to link and address events. Everything here acts on weft's own network namespace.

use std::io;

use futures::{StreamExt, TryStreamExt};
use ipnetwork::Ipv4Network;
use nix::errno::Errno;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, MulticastGroup};
use tokio::task::JoinHandle;

use super::{BridgeError, Fix, Link, Observed};

/// A netlink connection whose I/O task ends when this is dropped.
pub(super) struct Netlink {
    handle: Handle,
    task: JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The errno of a netlink error answer (the kernel sends it negated).
fn errno(err: &rtnetlink::Error) -> Option<Errno> {
    match err {
        rtnetlink::Error::NetlinkError(message) => {
            message.code.map(|code| Errno::from_raw(-code.get()))
        }
        _ => None,
    }
}

/// Without CAP_NET_ADMIN in the link's namespace every change answers EPERM.
fn denied(err: &rtnetlink::Error) -> bool {
    matches!(errno(err), Some(Errno::EPERM | Errno::EACCES))
}

/// A netlink error as the operator reads it: the OS's words for the errno.
pub(super) fn describe(err: &rtnetlink::Error) -> String {
    match errno(err) {
        Some(errno) => io::Error::from_raw_os_error(errno as i32).to_string(),
        None => err.to_string(),
    }
}

impl Netlink {
    pub(super) fn connect() -> Result<Netlink, BridgeError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| BridgeError::Connect { source })?;
        let task = tokio::spawn(connection);
        Ok(Netlink { handle, task })
    }

    /// The link called `name` and its IPv4 addresses; `None` when no link has that name.
    pub(super) async fn observe(&self, name: &str) -> Result<Observed, BridgeError> {
        let read_err = |source| BridgeError::ReadLink {
            name: name.to_string(),
            source,
        };
        let mut links = self.handle.link().get().match_name(name).execute();
        let message = match links.try_next().await {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(Observed { link: None }),
            Err(err) if errno(&err) == Some(Errno::ENODEV) => return Ok(Observed { link: None }),
            Err(err) => return Err(read_err(err)),
        };
        let mut link = link_view(&message);
        let addresses: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute()
            .try_collect()
            .await
            .map_err(|source| BridgeError::ReadAddresses {
                name: name.to_string(),
                source,
            })?;
        link.addresses = addresses.iter().filter_map(ipv4_address).collect();
        link.address_messages = addresses;
        Ok(Observed { link: Some(link) })
    }

    /// Applies one fix to the link `name` (whose state `observed` shows).
    pub(super) async fn apply(
        &self,
        name: &str,
        observed: &Observed,
        fix: &Fix,
    ) -> Result<(), BridgeError> {
        let index = observed.link.as_ref().map(|link| link.index);
        let result = match (fix, index) {
            (Fix::Create { mtu }, _) => {
                let mut bridge = LinkBridge::new(name);
                if let Some(mtu) = mtu {
                    bridge = bridge.mtu(*mtu);
                }
                match self.handle.link().add(bridge.build()).execute().await {
                    // Someone else created it meanwhile: the next observation decides.
                    Err(err) if errno(&err) == Some(Errno::EEXIST) => Ok(()),
                    other => other,
                }
            }
            (Fix::SetUp, Some(index)) => {
                let message = LinkUnspec::new_with_index(index).up().build();
                self.handle.link().set(message).execute().await
            }
            (Fix::SetMtu { to, .. }, Some(index)) => {
                let message = LinkUnspec::new_with_index(index).mtu(*to).build();
                self.handle.link().set(message).execute().await
            }
            (Fix::AddAddress(address), Some(index)) => {
                let request =
                    self.handle
                        .address()
                        .add(index, address.ip().into(), address.prefix());
                match request.execute().await {
                    // NLM_F_EXCL: the address appeared meanwhile, which is what we wanted.
                    Err(err) if errno(&err) == Some(Errno::EEXIST) => Ok(()),
                    other => other,
                }
            }
            (Fix::RemoveAddress(address), Some(_)) => {
                // The message the kernel listed names exactly this address and prefix: a
                // `10.2.0.1/24` is removed without touching `10.2.0.1/16`.
                let Some(message) = observed.link.as_ref().and_then(|link| {
                    link.address_messages
                        .iter()
                        .find(|m| ipv4_address(m) == Some(*address))
                }) else {
                    return Ok(());
                };
                match self.handle.address().del(message.clone()).execute().await {
                    // Already gone (removing a primary address takes its secondaries along).
                    Err(err) if errno(&err) == Some(Errno::EADDRNOTAVAIL) => Ok(()),
                    other => other,
                }
            }
            // The link vanished between observation and repair: the next pass recreates it.
            (_, None) => Ok(()),
        };
        result.map_err(|source| {
            if denied(&source) {
                BridgeError::NotPermitted {
                    name: name.to_string(),
                    action: fix.action(name),
                }
            } else {
                BridgeError::Change {
                    name: name.to_string(),
                    action: fix.action(name),
                    reason: describe(&source),
                }
            }
        })
    }
}

fn link_view(message: &LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        kind: None,
        up: message.header.flags.contains(LinkFlags::Up),
        mtu: None,
        addresses: Vec::new(),
        address_messages: Vec::new(),
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(kind.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// An IPv4 address with its prefix, as `ip addr` shows it (`10.2.0.1/16`).
fn ipv4_address(message: &AddressMessage) -> Option<Ipv4Network> {
    if message.header.family != AddressFamily::Inet {
        return None;
    }
    let mut address = None;
    for attribute in &message.attributes {
        match attribute {
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS the peer's on a
            // point-to-point link, the same on a bridge.
            AddressAttribute::Local(std::net::IpAddr::V4(ip)) => address = Some(*ip),
            AddressAttribute::Address(std::net::IpAddr::V4(ip)) if address.is_none() => {
                address = Some(*ip)
            }
            _ => {}
        }
    }
    Ipv4Network::new(address?, message.header.prefix_len).ok()
}

/// Link and IPv4 address events (RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR), as `ip monitor` gets them.
pub(super) struct Events {
    messages: futures::channel::mpsc::UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
    task: JoinHandle<()>,
}

impl Drop for Events {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What an event was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Event {
    /// A link was added, changed or removed.
    Link { index: u32, name: Option<String> },
    /// An IPv4 address was added or removed on a link.
    Address { index: u32 },
    /// Anything else the groups carry.
    Other,
}

impl Events {
    pub(super) fn subscribe() -> Result<Events, BridgeError> {
        let (connection, _handle, messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
        ])
        .map_err(|source| BridgeError::Subscribe { source })?;
        let task = tokio::spawn(connection);
        Ok(Events { messages, task })
    }

    /// The next event; `None` when the subscription ended.
    pub(super) async fn next(&mut self) -> Option<Event> {
        let (message, _) = self.messages.next().await?;
        Some(event(message))
    }

    /// Events that are already queued, without waiting.
    pub(super) fn drain(&mut self) -> impl Iterator<Item = Event> + '_ {
        std::iter::from_fn(|| self.messages.try_recv().ok().map(|(m, _)| event(m)))
    }

    /// Whether the subscription still delivers.
    pub(super) fn is_open(&self) -> bool {
        !self.task.is_finished()
    }
}

fn event(message: NetlinkMessage<RouteNetlinkMessage>) -> Event {
    match message.payload {
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link),
        ) => Event::Link {
            index: link.header.index,
            name: link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name.clone()),
                _ => None,
            }),
        },
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewAddress(address) | RouteNetlinkMessage::DelAddress(address),
        ) => Event::Address {
            index: address.header.index,
        },
        _ => Event::Other,
    }
}
