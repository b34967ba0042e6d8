"""Packet-filter reduction invariants (property-based)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from projections.policy.filter import RuleIndex, reduce_rules
from projections.policy.ipset import AddressUnion, IPSet, parse_prefix
from projections.policy.model import PolicyNode
from projections.policy.resolve import host_prefix
from projections.policy.rules import CapEntry, DstEntry, DstIndex, Rule
from projections.policy.tailnet import EVERYTHING, INTERNET, NodeInfo

_CANDIDATES = [
    "100.64.0.1/32",
    "100.64.0.0/30",
    "100.64.0.0/10",
    "10.0.0.0/8",
    "10.33.0.0/16",
    "10.33.1.0/24",
    "192.168.1.0/24",
    "8.8.8.0/24",
    "fd7a:115c:a1e0::1/128",
    "fd7a:115c:a1e0::/48",
]

prefix_texts = st.sampled_from(_CANDIDATES)


@st.composite
def nodes(draw: st.DrawFn) -> NodeInfo:
    routes = draw(
        st.lists(
            st.sampled_from(["10.33.0.0/16", "192.168.1.0/24", "0.0.0.0/0", "::/0"]), unique=True
        )
    )
    return NodeInfo(
        PolicyNode(
            id=1,
            name="n",
            user_id=1,
            ipv4=draw(st.sampled_from(["100.64.0.1", "100.64.0.9"])),
            ipv6="fd7a:115c:a1e0::1",
            routable_ips=tuple(routes),
            approved_routes=tuple(routes),
        )
    )


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    src = AddressUnion((IPSet.of([parse_prefix("100.64.0.0/10")]),))
    if draw(st.booleans()):
        caps = tuple(
            CapEntry(
                tuple(
                    parse_prefix(p) for p in draw(st.lists(prefix_texts, min_size=1, max_size=3))
                ),
                (("a.com/c", None),),
            )
            for _ in range(draw(st.integers(1, 3)))
        )
        return Rule(("100.64.0.0/10",), src, caps=caps)
    entries = []
    for text in draw(st.lists(st.sampled_from([*_CANDIDATES, "*"]), min_size=1, max_size=5)):
        addresses = EVERYTHING if text == "*" else IPSet.of([parse_prefix(text)])
        entries.append(DstEntry(text, 22, 22, addresses))
    return Rule(("100.64.0.0/10",), src, tuple(entries), protocols=(6,))


def _relevant(node: NodeInfo, entry: DstEntry) -> bool:
    a = entry.addresses
    return (
        any(a.contains(x) for x in node.addrs)
        or any(a.overlaps_prefix(r) for r in node.subnet_routes)
        or (node.is_exit and a.issubset(INTERNET))
    )


@given(nodes(), st.lists(rules(), max_size=6))
def test_reduction_keeps_exactly_the_relevant_entries(
    node: NodeInfo, given_rules: list[Rule]
) -> None:
    reduced = reduce_rules(node, given_rules)
    port_rules = [r for r in given_rules if r.dst]
    kept_port_rules = [r for r in reduced if r.dst]
    expected = [[e for e in r.dst if _relevant(node, e)] for r in port_rules]
    assert [list(r.dst) for r in kept_port_rules] == [e for e in expected if e]
    for rule in kept_port_rules:
        assert rule.src == ("100.64.0.0/10",)
        assert rule.protocols == (6,)


@given(nodes(), st.lists(rules(), max_size=6))
def test_capgrant_destinations_narrow_to_the_node(node: NodeInfo, given_rules: list[Rule]) -> None:
    own = {host_prefix(a) for a in node.addrs}
    cap_inputs = [d for r in given_rules for c in r.caps for d in c.dsts]
    for rule in reduce_rules(node, given_rules):
        for cap in rule.caps:
            assert cap.dsts
            for dst in cap.dsts:
                narrowed = dst in own and any(d.contains(dst.lo) for d in cap_inputs)
                routed = dst in cap_inputs and any(dst.overlaps(r) for r in node.subnet_routes)
                assert narrowed or routed


@given(nodes(), st.lists(rules(), max_size=6))
def test_reduction_is_idempotent(node: NodeInfo, given_rules: list[Rule]) -> None:
    once = reduce_rules(node, given_rules)
    twice = reduce_rules(node, once)
    assert [r.wire() for r in once] == [r.wire() for r in twice]


def test_exit_node_keeps_internet_destinations() -> None:
    exit_node = NodeInfo(
        PolicyNode(
            id=1,
            name="exit",
            tags=("tag:exit",),
            ipv4="100.64.0.5",
            routable_ips=("0.0.0.0/0",),
            approved_routes=("0.0.0.0/0",),
        )
    )
    plain = NodeInfo(PolicyNode(id=2, name="plain", tags=("tag:x",), ipv4="100.64.0.6"))
    src = AddressUnion((IPSet.of([parse_prefix("100.64.0.0/10")]),))
    rule = Rule(
        ("100.64.0.0/10",),
        src,
        (DstEntry("8.8.8.0/24", 53, 53, IPSet.of([parse_prefix("8.8.8.0/24")])),),
    )
    assert reduce_rules(exit_node, [rule])
    assert not reduce_rules(plain, [rule])


_SINGLES = ["100.64.0.1/32", "100.64.0.9/32", "100.64.0.2/32", "fd7a:115c:a1e0::1/128", "fd7a:115c:a1e0::2/128"]


@st.composite
def wide_rules(draw: st.DrawFn) -> Rule:
    """Like :func:`rules`, with up to 12 entries, mostly single addresses (an identity
    alias's members), so that both ways of reducing a rule are taken."""
    if draw(st.integers(0, 4)) == 0:
        return draw(rules())
    src = AddressUnion((IPSet.of([parse_prefix("100.64.0.0/10")]),))
    texts = draw(st.lists(st.sampled_from([*_SINGLES, *_SINGLES, *_CANDIDATES, "*"]), min_size=1, max_size=12))
    entries = tuple(
        DstEntry(t, 22, 22, EVERYTHING if t == "*" else IPSet.of([parse_prefix(t)])) for t in texts
    )
    return Rule((draw(st.sampled_from(["100.64.0.0/10", "100.64.0.3"])),), src, entries, protocols=(6,))


@given(nodes(), st.lists(wide_rules(), max_size=10))
def test_an_indexed_reduction_equals_the_plain_one(node: NodeInfo, given_rules: list[Rule]) -> None:
    """RuleIndex.reduce visits only the rules naming the node's addresses (and those
    with ranges or capabilities): the same reduced rules as reducing every rule."""
    got = RuleIndex(given_rules).reduce(node)
    assert [r.wire() for r in got] == [r.wire() for r in reduce_rules(node, given_rules)]


@given(wide_rules())
def test_a_dst_index_lists_each_address_entries_in_order(rule: Rule) -> None:
    """DstIndex gives, per single address, exactly the positions a scan of the entries
    finds, and every other entry among ``others``."""
    index = DstIndex(rule.dst)
    singles: dict[int, list[int]] = {}
    others = []
    for i, entry in enumerate(rule.dst):
        ranges = entry.addresses.ranges
        if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
            singles.setdefault(ranges[0][0], []).append(i)
        else:
            others.append(i)
    assert sorted(index.addresses()) == sorted(singles)
    assert {a: list(index.positions(a)) for a in singles} == singles
    assert list(index.others) == others
    assert index.positions(12345) == ()


def test_a_dst_index_keeps_a_bare_position_for_an_address_named_once() -> None:
    """The index of a rule to a group holds an item per member: one named once (one port
    range) is a bare int position, not a list or tuple of its own (issue 19, memory)."""
    src = AddressUnion((IPSet.of([parse_prefix("100.64.0.0/10")]),))
    texts = ["100.64.0.1/32", "100.64.0.2/32", "100.64.0.1/32", "100.64.0.0/30"]
    entries = tuple(DstEntry(t, 22, 22, IPSet.of([parse_prefix(t)])) for t in texts)
    index = Rule(("100.64.0.0/10",), src, entries).dst_index()
    one, two = parse_prefix("100.64.0.1/32").lo, parse_prefix("100.64.0.2/32").lo
    assert index._singles == {one: (0, 2), two: 1}
    assert index.positions(two) == (1,)
    assert index.others == (3,)


def test_a_rule_a_node_keeps_whole_is_shared_not_copied() -> None:
    """Reduction hands back the very rule when it drops no entry (a rule to a node's own
    addresses, or to a range holding them): every node keeping it shares one object,
    rather than holding a copy each; a rule it narrows is a new one."""
    node = NodeInfo(PolicyNode(id=1, name="n", user_id=1, ipv4="100.64.0.1"))
    src = AddressUnion((IPSet.of([parse_prefix("100.64.0.0/10")]),))
    whole = Rule(
        ("100.64.0.0/10",),
        src,
        (DstEntry("100.64.0.1", 22, 22, IPSet.of([parse_prefix("100.64.0.1/32")])),
         DstEntry("100.64.0.0/30", 80, 80, IPSet.of([parse_prefix("100.64.0.0/30")]))),
        protocols=(6,),
    )
    wide = Rule(
        ("100.64.0.0/10",),
        src,
        tuple(
            DstEntry(f"100.64.0.{k}", 22, 22, IPSet.of([parse_prefix(f"100.64.0.{k}/32")]))
            for k in range(1, 11)
        ),
    )
    reduced = reduce_rules(node, [whole, wide])
    assert reduced[0] is whole
    assert reduced[1] is not wide
    assert [e.ip for e in reduced[1].dst] == ["100.64.0.1"]
    assert RuleIndex([whole, wide]).reduce(node)[0] is whole


def test_a_rule_signature_holds_its_entry_tuples_not_their_ids() -> None:
    """A signature tells rules apart by their very entry objects: it keys on the rule's
    own ``dst`` and ``caps`` tuples (entries compare by identity), holding no new int
    per entry (issue 19, memory), and no id a later entry could reuse."""
    src = AddressUnion((IPSet.of([parse_prefix("100.64.0.0/10")]),))
    entries = tuple(
        DstEntry(f"100.64.0.{k}", 22, 22, IPSet.of([parse_prefix(f"100.64.0.{k}/32")])) for k in (1, 2)
    )
    rule = Rule(("100.64.0.0/10",), src, entries, protocols=(6,))
    key = rule.signature().key
    assert key[2] is rule.dst and key[3] is rule.caps
    assert Rule(("100.64.0.0/10",), src, entries, protocols=(6,)).signature() == rule.signature()
    copies = tuple(DstEntry(e.ip, e.first, e.last, e.addresses) for e in entries)
    assert Rule(("100.64.0.0/10",), src, copies, protocols=(6,)).signature() != rule.signature()


def test_a_rule_index_keeps_a_bare_position_for_an_address_one_rule_names() -> None:
    """Issue 19, memory: a RuleIndex holds an item per address its rules name; one
    named by a single rule maps to that rule's position as a bare int, one named by
    several to a tuple (each position once), and reducing through it is unchanged."""
    src = AddressUnion((IPSet.of([parse_prefix("100.64.0.0/10")]),))

    def entry(text: str, port: int) -> DstEntry:
        return DstEntry(text, port, port, IPSet.of([parse_prefix(f"{text}/32")]))

    rules = [
        Rule(("100.64.0.0/10",), src, (entry("100.64.0.1", 22), entry("100.64.0.2", 22), entry("100.64.0.1", 80))),
        Rule(("100.64.0.3",), src, (entry("100.64.0.2", 443),)),
    ]
    index = RuleIndex(rules)
    one, two = parse_prefix("100.64.0.1/32").lo, parse_prefix("100.64.0.2/32").lo
    assert index._by_addr == {one: 0, two: (0, 1)}
    for ip in ("100.64.0.1", "100.64.0.2", "100.64.0.9"):
        node = NodeInfo(PolicyNode(id=1, name="n", user_id=1, ipv4=ip))
        assert [r.wire() for r in index.reduce(node)] == [r.wire() for r in reduce_rules(node, rules)]
