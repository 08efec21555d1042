from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as _external_auth_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Requirement(_message.Message):
    __slots__ = ("sensitivity", "min_assurance", "max_age_seconds", "required_amr", "risk_rules")
    SENSITIVITY_FIELD_NUMBER: _ClassVar[int]
    MIN_ASSURANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_AMR_FIELD_NUMBER: _ClassVar[int]
    RISK_RULES_FIELD_NUMBER: _ClassVar[int]
    sensitivity: str
    min_assurance: str
    max_age_seconds: int
    required_amr: _containers.RepeatedScalarFieldContainer[str]
    risk_rules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sensitivity: _Optional[str] = ..., min_assurance: _Optional[str] = ..., max_age_seconds: _Optional[int] = ..., required_amr: _Optional[_Iterable[str]] = ..., risk_rules: _Optional[_Iterable[str]] = ...) -> None: ...

class Presented(_message.Message):
    __slots__ = ("subject", "issuer", "principal", "assurance", "acr", "amr", "auth_age_seconds", "credential", "roles", "groups", "scopes", "level_source")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ASSURANCE_FIELD_NUMBER: _ClassVar[int]
    ACR_FIELD_NUMBER: _ClassVar[int]
    AMR_FIELD_NUMBER: _ClassVar[int]
    AUTH_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    LEVEL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    subject: str
    issuer: str
    principal: str
    assurance: str
    acr: str
    amr: _containers.RepeatedScalarFieldContainer[str]
    auth_age_seconds: int
    credential: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    groups: _containers.RepeatedScalarFieldContainer[str]
    scopes: _containers.RepeatedScalarFieldContainer[str]
    level_source: str
    def __init__(self, subject: _Optional[str] = ..., issuer: _Optional[str] = ..., principal: _Optional[str] = ..., assurance: _Optional[str] = ..., acr: _Optional[str] = ..., amr: _Optional[_Iterable[str]] = ..., auth_age_seconds: _Optional[int] = ..., credential: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., groups: _Optional[_Iterable[str]] = ..., scopes: _Optional[_Iterable[str]] = ..., level_source: _Optional[str] = ...) -> None: ...

class SensitivityCandidate(_message.Message):
    __slots__ = ("rule", "level", "won")
    RULE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    WON_FIELD_NUMBER: _ClassVar[int]
    rule: str
    level: str
    won: bool
    def __init__(self, rule: _Optional[str] = ..., level: _Optional[str] = ..., won: _Optional[bool] = ...) -> None: ...

class PermissionVerdict(_message.Message):
    __slots__ = ("rule", "granted", "missing")
    RULE_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    rule: str
    granted: bool
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rule: _Optional[str] = ..., granted: _Optional[bool] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class RiskVerdict(_message.Message):
    __slots__ = ("rule", "fired", "raise_by", "max_age_seconds")
    RULE_FIELD_NUMBER: _ClassVar[int]
    FIRED_FIELD_NUMBER: _ClassVar[int]
    RAISE_BY_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    rule: str
    fired: bool
    raise_by: int
    max_age_seconds: int
    def __init__(self, rule: _Optional[str] = ..., fired: _Optional[bool] = ..., raise_by: _Optional[int] = ..., max_age_seconds: _Optional[int] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("outcome", "reason", "http_status", "description", "matched_rules", "requirement", "presented", "www_authenticate", "policy_version", "decision_id", "normalized_path", "sensitivity_rules", "permissions", "risks", "headers", "removed_headers")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MATCHED_RULES_FIELD_NUMBER: _ClassVar[int]
    REQUIREMENT_FIELD_NUMBER: _ClassVar[int]
    PRESENTED_FIELD_NUMBER: _ClassVar[int]
    WWW_AUTHENTICATE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_PATH_FIELD_NUMBER: _ClassVar[int]
    SENSITIVITY_RULES_FIELD_NUMBER: _ClassVar[int]
    PERMISSIONS_FIELD_NUMBER: _ClassVar[int]
    RISKS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_HEADERS_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    reason: str
    http_status: int
    description: str
    matched_rules: _containers.RepeatedScalarFieldContainer[str]
    requirement: Requirement
    presented: Presented
    www_authenticate: str
    policy_version: str
    decision_id: str
    normalized_path: str
    sensitivity_rules: _containers.RepeatedCompositeFieldContainer[SensitivityCandidate]
    permissions: _containers.RepeatedCompositeFieldContainer[PermissionVerdict]
    risks: _containers.RepeatedCompositeFieldContainer[RiskVerdict]
    headers: _containers.ScalarMap[str, str]
    removed_headers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, outcome: _Optional[str] = ..., reason: _Optional[str] = ..., http_status: _Optional[int] = ..., description: _Optional[str] = ..., matched_rules: _Optional[_Iterable[str]] = ..., requirement: _Optional[_Union[Requirement, _Mapping]] = ..., presented: _Optional[_Union[Presented, _Mapping]] = ..., www_authenticate: _Optional[str] = ..., policy_version: _Optional[str] = ..., decision_id: _Optional[str] = ..., normalized_path: _Optional[str] = ..., sensitivity_rules: _Optional[_Iterable[_Union[SensitivityCandidate, _Mapping]]] = ..., permissions: _Optional[_Iterable[_Union[PermissionVerdict, _Mapping]]] = ..., risks: _Optional[_Iterable[_Union[RiskVerdict, _Mapping]]] = ..., headers: _Optional[_Mapping[str, str]] = ..., removed_headers: _Optional[_Iterable[str]] = ...) -> None: ...
