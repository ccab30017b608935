"""Who submitted a result: access tokens resolved to profiles (static tokens, OIDC userinfo)."""
