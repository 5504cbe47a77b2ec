//! Links and traffic control in the pod's namespace: the tap's MTU and
//! state, an ingress qdisc on each side, and the two match-all u32 filters
//! whose mirred action moves every frame across (Kata's "tcfilter" model).

use zygote_netlink::route::RouteNetlinkMessage;
use zygote_netlink::route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use zygote_netlink::route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
    TcActionOption, TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use zygote_netlink::{CREATE_EXCL, Netlink};

/// The ingress qdisc's handle (`ffff:`), the parent of its filters.
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
/// `ETH_P_ALL` in network byte order, as a filter's protocol.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();
/// The filters' priority.
const PRIORITY: u16 = 1;

/// Link `name`: its index and whether it is a tun/tap device, if it exists.
pub fn find_link(nl: &mut Netlink, name: &str) -> std::io::Result<Option<(u32, bool)>> {
    let links = nl.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
    Ok(links.into_iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(l)
            if l.attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name)) =>
        {
            let tun = l.attributes.iter().any(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Tun))),
                _ => false,
            });
            Some((l.header.index, tun))
        }
        _ => None,
    }))
}

/// Sets link `index`'s MTU and brings it up.
pub fn set_up_with_mtu(nl: &mut Netlink, index: u32, mtu: u32) -> std::io::Result<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg.attributes.push(LinkAttribute::Mtu(mtu));
    nl.request(RouteNetlinkMessage::SetLink(msg), 0)
}

/// Deletes link `index`.
pub fn delete_link(nl: &mut Netlink, index: u32) -> std::io::Result<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    nl.request(RouteNetlinkMessage::DelLink(msg), 0)
}

fn ingress_qdisc(index: u32) -> TcMessage {
    let mut msg = TcMessage::with_index(index as i32);
    msg.header.parent = TcHandle::INGRESS;
    msg.header.handle = INGRESS_HANDLE;
    msg.attributes.push(TcAttribute::Kind("ingress".into()));
    msg
}

/// Adds an ingress qdisc to link `index` (an error if it has one).
pub fn add_ingress(nl: &mut Netlink, index: u32) -> std::io::Result<()> {
    nl.request(
        RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(index)),
        CREATE_EXCL,
    )
}

/// Removes link `index`'s ingress qdisc and with it its filters; `Ok(false)`
/// if it had none.
pub fn delete_ingress(nl: &mut Netlink, index: u32) -> std::io::Result<bool> {
    match nl.request(
        RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)),
        0,
    ) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every frame arriving at link `from` leaves by link `to`:
/// `tc filter add dev FROM parent ffff: protocol all u32 match u8 0 0
/// action mirred egress redirect dev TO`.
pub fn redirect(nl: &mut Netlink, from: u32, to: u32) -> std::io::Result<()> {
    let mut msg = TcMessage::with_index(from as i32);
    msg.header.parent = INGRESS_HANDLE;
    msg.header.info = u32::from(TcHandle {
        major: PRIORITY,
        minor: ETH_P_ALL_BE,
    });
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    msg.attributes
        .push(TcAttribute::Kind(TcFilterU32::KIND.into()));
    msg.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(selector)),
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
    ]));
    nl.request(RouteNetlinkMessage::NewTrafficFilter(msg), CREATE_EXCL)
}
