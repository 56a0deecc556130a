"""Membership: rendezvous with a tier's scheduler, ranks, barriers, heartbeats and dead-node detection.

Each tier (a party, or the global tier) has one scheduler. A process that belongs to two tiers (a local
server, a global server) holds one :class:`~geomx.membership.member.TierMember` per tier.
"""
from .member import TierInfo, TierMember
from .scheduler import Scheduler

__all__ = ["Scheduler", "TierMember", "TierInfo"]
