from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetBalanceRequest(_message.Message):
    __slots__ = ("account_id",)
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    def __init__(self, account_id: _Optional[str] = ...) -> None: ...

class Balance(_message.Message):
    __slots__ = ("account_id", "amount_cents", "currency", "seen_subject", "seen_assurance")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    SEEN_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SEEN_ASSURANCE_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    amount_cents: int
    currency: str
    seen_subject: str
    seen_assurance: str
    def __init__(self, account_id: _Optional[str] = ..., amount_cents: _Optional[int] = ..., currency: _Optional[str] = ..., seen_subject: _Optional[str] = ..., seen_assurance: _Optional[str] = ...) -> None: ...

class TransferRequest(_message.Message):
    __slots__ = ("from_account", "to_account", "amount_cents")
    FROM_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    TO_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    from_account: str
    to_account: str
    amount_cents: int
    def __init__(self, from_account: _Optional[str] = ..., to_account: _Optional[str] = ..., amount_cents: _Optional[int] = ...) -> None: ...

class TransferReceipt(_message.Message):
    __slots__ = ("transfer_id", "seen_subject", "seen_assurance")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    SEEN_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SEEN_ASSURANCE_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    seen_subject: str
    seen_assurance: str
    def __init__(self, transfer_id: _Optional[str] = ..., seen_subject: _Optional[str] = ..., seen_assurance: _Optional[str] = ...) -> None: ...

class SetPermissionsRequest(_message.Message):
    __slots__ = ("user_id", "roles")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ...) -> None: ...

class SetPermissionsResponse(_message.Message):
    __slots__ = ("seen_subject",)
    SEEN_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    seen_subject: str
    def __init__(self, seen_subject: _Optional[str] = ...) -> None: ...
