"""Submitter profiles: the claims perfdb keeps of a user, and what readers may see of them."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

# Profile claims kept from a userinfo response; everything else (tokens, custom claims) is dropped.
PROFILE_CLAIMS = ("name", "given_name", "family_name", "picture", "locale", "email", "email_verified", "hd")
PRIVATE_CLAIMS = frozenset({"email", "email_verified"})
_MAX_CLAIM_CHARS = 2048


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    """A resolved submitter. `stored` is the canonical JSON kept in the database."""

    user_id: str
    claims: dict[str, Any]
    stored: bytes

    @classmethod
    def create(cls, user_id: str, claims: dict[str, Any]) -> Profile:
        document = {"user_id": user_id, **claims}
        return cls(user_id, claims, orjson.dumps(document, option=orjson.OPT_SORT_KEYS))


def profile_from_document(user_id: str, document: Any) -> Profile:
    """Rebuild a profile from its stored JSON (as export gives it); raises ValueError if unusable."""
    if not isinstance(document, dict) or document.get("user_id", user_id) != user_id:
        raise ValueError("a profile must be an object whose user_id matches its key")
    return Profile.create(user_id, clean_claims(document))


def public_profile(stored: dict[str, Any], expose_emails: bool) -> dict[str, Any]:
    """The profile as readers see it: no e-mail address unless the operator allows it."""
    if expose_emails:
        return stored
    return {key: value for key, value in stored.items() if key not in PRIVATE_CLAIMS}


def clean_claims(document: dict[str, Any]) -> dict[str, Any]:
    """The profile claims perfdb keeps, each a bool or a bounded string."""
    claims: dict[str, Any] = {}
    for claim in PROFILE_CLAIMS:
        value = document.get(claim)
        if isinstance(value, bool) or (isinstance(value, str) and len(value) <= _MAX_CLAIM_CHARS):
            claims[claim] = value
    return claims
