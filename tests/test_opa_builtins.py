"""OPA's builtins that pdp adds to the embedded engine, checked against OPA's own conformance cases.

Each group is transcribed from a file of OPA's conformance suite (the path is
in the comment above it, under ``v1/test/cases/testdata/v1/`` in
open-policy-agent/opa); the expected values and errors are OPA's. The cases
call the builtin as ``x := f(a)`` where OPA's files use the output-argument
form ``f(a, x)``: the embedded engine does not accept that form for extension
functions (``test_output_argument_form_is_refused_at_load``). Long literals
(certificates, tokens) are passed as data documents where OPA's files inline
them: the embedded engine refuses a module line longer than 1,024 columns.
"""

from __future__ import annotations

import base64
import hmac
import json
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
import regorus

from pdp import devpki
from pdp.policy.builtins import EXTENSIONS, native_builtins, register
from pdp.policy.decision_cache import NONDETERMINISTIC, DecisionCache
from pdp.policy.engine import PolicyBundle, PolicyEngine, PolicyEvalError, load_bundle
from pdp.policy.rego import RegorusEvaluator

ERROR = object()


def evaluate(module: str, query: str, data: dict[str, Any] | None = None,
             input_doc: dict[str, Any] | None = None) -> Any:
    """The value of ``query`` on a real regorus engine with pdp's extensions, as JSON."""
    engine = regorus.Engine()
    register(engine)
    engine.add_policy("case.rego", module)
    engine.add_data(data or {})
    if input_doc is not None:
        engine.set_input(input_doc)
    return json.loads(engine.eval_rule_as_json(query))


def check(module: str, want: Any, *, error: str | None = None, query: str = "data.generated.p",
          data: dict[str, Any] | None = None, input_doc: dict[str, Any] | None = None,
          unordered: bool = False) -> None:
    if error is not None:
        with pytest.raises(BaseException) as info:
            evaluate(module, query, data, input_doc)
        assert error in str(info.value)
        return
    got = evaluate(module, query, data, input_doc)
    if unordered:
        assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, want))
    else:
        assert got == want


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def generated(body: str) -> str:
    return "package generated\n\n" + body


# --- io.jwt.decode ---------------------------------------------------------------------------------------

# jwtbuiltins/test-jwtbuiltins-0390, 0391, 0392, 0394, 0395, 0398, 0399.yaml
JWT_DECODE = [
    ("simple-non-registered",
     "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJuZXciOiJJIGFtIGEgdXNlciBjcmVhdGVkIGZpZWxkIiwiaXNzIjoib3BhIn0."
     "6UmjsclVDGD9jcmX_F8RJzVgHtUZuLu2pxkF_UEQCrE",
     [{"alg": "HS256", "typ": "JWT"}, {"iss": "opa", "new": "I am a user created field"},
      "e949a3b1c9550c60fd8dc997fc5f112735601ed519b8bbb6a71905fd41100ab1"], None),
    ("no-support-jwe",
     "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImVuYyI6ImJsYWgifQ.eyJuZXciOiJJIGFtIGEgdXNlciBjcmVhdGVkIGZpZWxkIiwia"
     "XNzIjoib3BhIn0.McGUb1e-UviZKy6UyQErNNQzEUgeV25Buwk7OHOa8U8",
     None, "JWT is a JWE object, which is not supported"),
    ("no-periods",
     "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9eyJzdWIiOiIwIiwiaXNzIjoib3BhIn0XmVoLoHI3pxMtMO_WRONMSJzGUDP9pDjy8Jp0_"
     "tdRXY",
     None, "encoded JWT had no period separators"),
    ("bad-header-encoding",
     "eyJhbGciOiJIU^%zI1NiI+sInR5cCI6IkpXVCJ9.eyJzdWIiOiIwIiwiaXNzIjoib3BhIn0.XmVoLoHI3pxMtMO_WRONMSJzGUDP9pDj"
     "y8Jp0_tdRXY",
     None, "JWT header had invalid encoding: illegal base64 data at input byte 13"),
    ("bad-payload-encoding",
     "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIwIiwia/XNzIjoib3BhIn0.XmVoLoHI3pxMtMO_WRONMSJzGUDP9pDjy8"
     "Jp0_tdRXY",
     None, "JWT payload had invalid encoding: illegal base64 data at input byte 17"),
    ("double-nested",
     "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImN0eSI6IkpXVCJ9.ImV5SmhiR2NpT2lKSVV6STFOaUlzSW5SNWNDSTZJa3BYVkNJc0l"
     "tTjBlU0k2SWtwWFZDSjkuSW1WNVNtaGlSMk5wVDJsS1NWVjZTVEZPYVVselNXNVNOV05EU1RaSmEzQllWa05LT1M1bGVVcDZaRmRKYVU5"
     "cFNYZEphWGRwWVZoT2VrbHFiMmxpTTBKb1NXNHdMbGh0Vm05TWIwaEpNM0I0VFhSTlQxOVhVazlPVFZOS2VrZFZSRkE1Y0VScWVUaEtj"
     "REJmZEdSU1dGa2kuOFcwcXg0bUx4c2xtWmw3d0VNVVdCeEg3dFNUM1hzRXVXWHhlc1hxRm5SSSI.U8rwnGAJ-bJoGrAYKEzNtbJQWd3x"
     "1eW0Y25nLKHDCgo",
     [{"alg": "HS256", "typ": "JWT"}, {"iss": "opa", "sub": "0"},
      "5e65682e81c8de9c4cb4c3bf59138d3122731940cff690e3cbc269d3fb5d4576"], None),
    ("complex-values",
     "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIwIiwiaXNzIjoib3BhIiwiZXh0Ijp7ImFiYyI6IjEyMyIsImNiYSI6WzE"
     "wLCIxMCJdfX0.IIxF-uJ6i4K5Dj71xNLnUeqB9jmujl6ujTInhii1PxE",
     [{"alg": "HS256", "typ": "JWT"}, {"ext": {"abc": "123", "cba": [10, "10"]}, "iss": "opa", "sub": "0"},
      "208c45fae27a8b82b90e3ef5c4d2e751ea81f639ae8e5eae8d32278628b53f11"], None),
]


@pytest.mark.parametrize(("note", "token", "want", "error"), JWT_DECODE, ids=[c[0] for c in JWT_DECODE])
def test_jwt_decode(note: str, token: str, want: Any, error: str | None) -> None:
    check(generated(f"p := [x, y, z] if {{\n\t[x, y, z] := io.jwt.decode({json.dumps(token)})\n}}\n"), want,
          error=error)


# --- io.jwt.decode_verify and io.jwt.verify_* -------------------------------------------------------------

CERT_WHATEVER = """-----BEGIN CERTIFICATE-----
MIIC/DCCAeSgAwIBAgIJAJRvYDU3ei3EMA0GCSqGSIb3DQEBCwUAMBMxETAPBgNV
BAMMCHdoYXRldmVyMB4XDTE4MDgxMDEwMzgxNloXDTE4MDkwOTEwMzgxNlowEzER
MA8GA1UEAwwId2hhdGV2ZXIwggEiMA0GCSqGSIb3DQEBAQUAA4IBDwAwggEKAoIB
AQC4kCmzLMW/5jzkzkmN7Me8wPD+ymBUIjsGqliGfMrfFfDV2eTPVtZcYD3IXoB4
AOUT7XJzWjOsBRFOcVKKEiCPjXiLcwLb/QWQ1x0Budft32r3+N0KQd1rgcRHTPNc
JoeWCfOgDPp51RTzTT6HQuV4ud+CDhRJP7QMVMIgal9Nuzs49LLZaBPW8/rFsHjk
JQ4kDujSrpcT6F2FZY3SmWsOJgP7RjVKk5BheYeFKav5ZV4p6iHn/TN4RVpvpNBh
5z/XoHITJ6lpkHSDpbIaQUTpobU2um8N3biz+HsEAmD9Laa27WUpYSpiM6DDMSXl
dBDJdumerVRJvXYCtfXqtl17AgMBAAGjUzBRMB0GA1UdDgQWBBRz74MkVzT2K52/
FJC4mTa9coM/DTAfBgNVHSMEGDAWgBRz74MkVzT2K52/FJC4mTa9coM/DTAPBgNV
HRMBAf8EBTADAQH/MA0GCSqGSIb3DQEBCwUAA4IBAQAD1ZE4IaIAetqGG+vt9oz1
Ix0j4EPok0ONyhhmiSsF6rSv8zlNWweVf5y6Z+AoTNY1Fym0T7dbpbqIox0EdKV3
FLzniWOjznupbnqfXwHX/g1UAZSyt3akSatVhvNpGlnd7efTIAiNinX/TkzIjhZ7
ihMIZCGykT1P0ys1OaeEf57wAzviatD4pEMTIW0OOqY8bdRGhuJR1kKUZ/2Nm8Ln
y7E0y8uODVbH9cAwGyzWB/QFc+bffNgi9uJaPQQc5Zxwpu9utlqyzFvXgV7MBYUK
EYSLyxp4g4e5aujtLugaC8H6n9vP1mEBr/+T8HGynBZHNTKlDhhL9qDbpkkNB6/w
-----END CERTIFICATE-----"""

CERT_LOCALHOST = """-----BEGIN CERTIFICATE-----
MIIFiDCCA3ACCQCGV6XsfG/oRTANBgkqhkiG9w0BAQUFADCBhTELMAkGA1UEBhMC
VVMxEzARBgNVBAgMCkNhbGlmb3JuaWExFTATBgNVBAcMDFJlZHdvb2QgQ2l0eTEO
MAwGA1UECgwFU3R5cmExDDAKBgNVBAsMA0RldjESMBAGA1UEAwwJbG9jYWxob3N0
MRgwFgYJKoZIhvcNAQkBFglhc2hAc3R5cmEwHhcNMTgwMzA2MDAxNTU5WhcNMTkw
MzA2MDAxNTU5WjCBhTELMAkGA1UEBhMCVVMxEzARBgNVBAgMCkNhbGlmb3JuaWEx
FTATBgNVBAcMDFJlZHdvb2QgQ2l0eTEOMAwGA1UECgwFU3R5cmExDDAKBgNVBAsM
A0RldjESMBAGA1UEAwwJbG9jYWxob3N0MRgwFgYJKoZIhvcNAQkBFglhc2hAc3R5
cmEwggIiMA0GCSqGSIb3DQEBAQUAA4ICDwAwggIKAoICAQDucnAwTRA0zqDQ671L
KWOVwhjhycFyzyhZUd7vhsnslOBiYM6TYIDXhETfAk2RQoRE/9xF16woMD8FOglc
lSuhi+GNfFRif6LfArm84ZFj1ZS1MX2logikhXhRJQ7AOHe5+ED0re3KH5lWyqfz
R6bQuPYwTQSBJy6Tq7T9RiOM29yadCX64OaCEbzEFmHtNlbb5px4zCVvgskg/fpV
GGCMpAYjGDatbxE5eAloVs1EJuI5RSqWr1JRm6EejxM04BFdfGn1HgWrsKXtlvBa
00/AC0zXL5n6LK7+L3WbRguVTZcE4Yu70gDwhmM+VsKeT9LKClX003BNj0NJDRB9
dw9MaWxsXDNHNOWEfbnASXeP7ZRv3D81ftij6P8SL14ZnxyrRty8TAN4ij3wd41l
astRQCtrJFi+HzO606XOp6HDzBoWT0DGl8Sn2hZ6RLPyBnD04vvvcSGeCVjHGOQ8
c3OTroK58u5MR/q4T00sTkeeVAxuKoEWKsjIBYYrJTe/a2mEq9yiDGbPNYDnWnQZ
jSUZm+Us23Y2sm/agZ5zKXcEuoecGL6sYCixr/xeB9BPxEiTthH+0M8OY99qpIhz
Smj41wdgQfzZi/6B8pIr77V/KywYKxJEmzw8Uy48aC/rZ8WsT8QdKwclo1aiNJhx
79OvGbZFoeHD/w7igpx+ttpF/wIDAQABMA0GCSqGSIb3DQEBBQUAA4ICAQC3wWUs
fXz+aSfFVz+O3mLFkr65NIgazbGAySgMgMNVuadheIkPL4k21atyflfpx4pg9FGv
40vWCLMajpvynfz4oqah0BACnpqzQ8Dx6HYkmlXK8fLB+WtPrZBeUEsGPKuJYt4M
d5TeY3VpNgWOPXmnE4lvxHZqh/8OwmOpjBfC9E3e2eqgwiwOkXnMaZEPgKP6JiWk
EFaQ9jgMQqJZnNcv6NmiqqsZeI0/NNjBpkmEWQl+wLegVusHiQ0FMBMQ0taEo21r
zUwHoNJR3h3wgGQiKxKOH1FUKHBV7hEqObLraD/hfG5xYucJfvvAAP1iH0ycPs+9
hSccrn5/HY1c9AZnW8Kh7atp/wFP+sHjtECWK/lUmXfhASS293hprCpJk2n9pkmR
ziXKJhjwkxlC8NcHuiVfaxdfDa4+1Qta2gK7GEypbvLoEmIt/dsYUsxUg84lwJJ9
nyC/pfZ5a8wFSf186JeVH4kHd3bnkzlQz460HndOMSJ/Xi1wSfuZlOVupFf8TVKl
p4j28MTLH2Wqx50NssKThdaX6hoCiMqreYa+EVaN1f/cIGQxZSCzdzMCKqdB8lKB
3Eax+5zsIa/UyPwGxZcyXBRHAlz5ZnkjuRxInyiMkBWWz3IZXjTe6Fq8BNd2UWNc
w35+2nO5n1LKXgR2+nzhZUOk8TPsi9WUywRluQ==
-----END CERTIFICATE-----"""

PS256_OTHER_ISSUER = (
    "eyJhbGciOiAiUFMyNTYiLCAidHlwIjogIkpXVCJ9.eyJpc3MiOiAieHh4In0.iCePYnD1U13oBe_6ylhmojmkY_VZNYXqVszAej8RImMG"
    "v51OEqARmYFkRZYTiYCiVFober7vcDq_stOj1uAJCuttygGW_dpHiN-3EWsU2E2vCnXlygWe0ud38pOC-OVyEFbXxO9-m51vnS-3VmBjEO8"
    "G1UE8bLFXTeFOGkUIj9dqlefJSWh5wa8XA3g9mj0jqpuJi-7QgEIeVHk-JzhGpoFqI2f-Df_agVvc2x4V-6fJmj7wV2IsaFPRi36mVQmg8S"
    "-dkxu4AlaeCILhyNZl8ewjBHHBjJFRwzcy88L00mzdO51ZxEYsBdQav3ux2sc6vjT9PvvjAwzcthQxEoEaNA")
RS256_EXP_3000 = (
    "eyJhbGciOiAiUlMyNTYiLCAidHlwIjogIkpXVCJ9.eyJpc3MiOiAieHh4IiwgImV4cCI6IDMwMDB9.hqDP3AzshNhUZMI02U3nLPrj93QF"
    "rgs-74XFrF1Vry2bplrz-NKpdVdfTu8iY_bhmkWf2Om5DdwRZj2ZgpGahtnshnHaRq0RyqF-m3Y7oNj6JL_YMwgxsFIIHtBlagBqDU-gZK9"
    "9iqSOSGqVhvxqX6gCqFgE7vnEGHeeDedtRM53coAJuwzy8rQV9m3TewoofPdPasGv-dBLQZ3qgmnibkSgb7SmFpjXBy8zL3xJXOZhAHYlgc"
    "mcEoFVaWlBguIcWA87WZlpCLYcdYTJzSZweC3QLUhZ4RLJW84-LMKp6xWLLPrp3OgnsduB2G9PYMmYw_qCkuY1KGwfH4PvCQbAzQ")
RS256_NBF_1000 = (
    "eyJhbGciOiAiUlMyNTYiLCAidHlwIjogIkpXVCJ9.eyJuYmYiOiAxMDAwLCAiaXNzIjogInh4eCJ9.cwwYDfJhU_ambPIpwBJwDek05mif"
    "foudprr41IAYsl0IKekb1ii2uEgwkNM-LJtVXHe9hsK3gANFyfqoJuCZIBvaNMx_3Z0BUdeBs4k1UwBiZCpuud0ofgHKURwvehNgqDvRfch"
    "q_-K_Agi2iRdl0oShgLjN-gVbBl8pRwUbQrvASlcsCpZIKUyOzXNtaIZEFh1z6ISDy8UHHOdoieKpN23swya7QAcEb0wXEEKMkkhiRd5QHg"
    "WLk37Lnw2K89mKcq4Om0CtV9nHrxxmpYGSMPojCy16Gjdg5-xKyJWvxCfb3YUBUVM4RWa7ICOPRJWPuHxu9pPYG63hb_qDU6NLsw")
RS256_CRIT_JUNK = (
    "eyJjcml0IjogWyJqdW5rIl0sICJraWQiOiAiazEiLCAiYWxnIjogIlJTMjU2IiwgInR5cCI6ICJKV1QiLCAianVuayI6ICJ4eHgifQ.eyJ"
    "pc3MiOiAieHh4IiwgInN1YiI6ICJmcmVkIn0.YfoUpW5CgDBtxtBuOix3cdYJGT8cX9Mq7wOhIbjDK7eRQUsAmMY_0EQPh7bd7Yi1gLI3e"
    "11BKzguf2EHqAa1kbkHWwFniBO-RIi8q42v2uxC4lpEpIjfaaXB5XmsLfAXtYRqh0AObvbSho6VDXBP_Kn81nhIiE2yFbH14_jhRMSxDBs5"
    "ToSkXV-XJHw5bONP8NxPqEk9KF3ZJGzN7J_KoD6LjqfYai5K0eLNEIZh4C1WjTdmCKMR4K6ieZRQWZiSsnhSqLSQERir4n22G3QsdY7dOnC"
    "p-SS4VYu3V-PfsOSFMvQ-TTAN1geqMZ9A7k1CCLW0wxKBs-KCiYzmRTzwxA")
RS256_NESTED = (
    "eyJhbGciOiAiUlMyNTYiLCAidHlwIjogIkpXVCIsICJjdHkiOiAiSldUIn0.ZXlKaGJHY2lPaUFpVWxNeU5UWWlMQ0FpZEhsd0lqb2dJ"
    "a3BYVkNKOS5leUpwYzNNaU9pQWllSGg0SW4wLnJSUnJlUU9DYW9ZLW1Nazcyak5GZVk1YVlFUWhJZ0lFdFZkUTlYblltUUwyTHdfaDdNbkk"
    "0U0VPMVBwa0JIVEpyZnljbEplTHpfalJ2UGdJMlcxaDFCNGNaVDhDZ21pVXdxQXI5c0puZHlVQ1FtSWRrbm53WkI5cXAtX3BTdGRHWEo5Wn"
    "AzeEo4NXotVEJpWlN0QUNUZFdlUklGSUU3VkxPa20tRmxZdzh5OTdnaUN4TmxUdWl3amxlTjMwZDhnWHUxNkZGQzJTSlhtRjZKbXYtNjJHb"
    "ERhLW1CWFZ0bGJVSTVlWVUwaTdueTNyQjBYUVQxRkt4ZUZ3OF85N09FdV9jY3VLcl82ZHlHZVFHdnQ5Y3JJeEFBMWFZbDdmbVBrNkVhcjll"
    "TTNKaGVYMi00Wkx0d1FOY1RDT01YV0dIck1DaG5MWVc4WEFrTHJEbl9yRmxUaVMtZw.Xicc2sWCZ_Nithucsw9XD7YOKrirUdEnH3MyiPM-"
    "Ck3vEU2RsTBsfU2JPhfjp3phc0VOgsAXCzwU5PwyNyUo1490q8YSym-liMyO2Lk-hjH5fAxoizg9yD4II_lK6Wz_Tnpc0bBGDLdbuUhvgvO"
    "7yqo-leBQlsfRXOvw4VSPSEy8QPtbURtbnLpWY2jGBKz7vGI_o4qDJ3PicG0kyEiWZNh3wjeeCYRCWvXN8qh7Uk5EA-8J5vX651GqV-7gmaX"
    "1n-8DXamhaCQcE-p1cjSj04-X-_bJlQtmb-TT3bSyUPxgHVncvxNUby8jkUTzfi5MMbmIzWWkxI5YtJTdtmCkPQ")
RS256_AUD_FRED = (
    "eyJhbGciOiAiUlMyNTYiLCAidHlwIjogIkpXVCJ9.eyJpc3MiOiAieHh4IiwgImF1ZCI6ICJmcmVkIn0.F-9m2Tx8r1tuQFirazsI4FK05b"
    "XX3uP4ut8M2FryJ07k3bQhy262fdwNDmuFcGx0NfL-c80agcwGoTzMWXkVEgZ2KTz0QSAdcdGk3ZWtUy-Mj2IilZ1dzkVvW8LsithYFTGcU"
    "tkelFDrJwtMQ0Kum7SXJpC_HCBk4PbftY0XD6jRgHLnQdeT9_J11L4sd19vCdpxxxm3_m_yvUV3ZynzB4vhQbS3CET4EClAVhi-m_gMh9mj8"
    "5gY1ycIz6-FxWv8xM2Igm2SMeIdyJwAvEGnIauRS928P_OqVCZgCH2Pafnxtzy77Llpxy8XS0xu5PtPw3_azhg33GaXDCFsfz6GpA")
RS256_JOHN_DOE = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiYWRtaW4iOnRydWUsI"
    "mlhdCI6MTUxNjIzOTAyMn0.ZcLZbBKpPFFz8YGD2jEbXzwHT7DWtqRVk1PTV-cAWUV8jr6f2a--Fw9SFR3vSbrtFif06AQ3aWY7PMM2AuxD"
    "jiUVGjItmHRz0sJBEijcE2QVkDN7MNK3Kk1fsM_hbEXzNCzChZpEkTZnLy9ijkJJFD0j6lBat4lO5Zc_LC2lXUftV_hU2aW9mQ7pLSgJjItz"
    "RymivnN0g-WUDq5IPK_M8b3yPy_N9iByj8B2FO0sC3TuOrXWbrYrX4ve4bAaSqOFOXiL5Z5BJfmmtT--xKdWDGJxnei8lbv7in7t223fVsU"
    "psH-zmybp529Fya37BsaIlcgLrl38ghvoqy2sHu2wAA")
JWKS_EC_AND_RSA = json.dumps({"keys": [
    {"kty": "EC", "use": "sig", "crv": "P-256", "kid": "k1", "x": "9Qq5S5VqMQoH-FOI4atcH6V3bua03C-5ZMZMG1rszwA",
     "y": "LLbFxWkGBEBrTm1GMYZJy1OXCH1KLweJMCgIEPIsibU", "alg": "ES256"},
    {"kty": "RSA", "e": "AQAB", "use": "enc", "kid": "k2", "alg": "RS256",
     "n": "sGu-fYVE2nq2dPxJlqAMI0Z8G3FD0XcWDnD8mkfO1ddKRGuUQZmfj4gWeZGyIk3cnuoy7KJCEqa3daXc08QHuFZyfn0rH33t8_AFsvb0q"
          "0i7R2FK-Gdqs_E0-sGpYMsRJdZWfCioLkYjIHEuVnRbi3DEsWqe484rEGbKF60jNRgGC4b-8pz-E538ZkssWxcqHrYIj5bjGEU36onjS3M_"
          "yrTuNvzv_8wRioK4fbcwmGne9bDxu8LcoSReWpPn0CnUkWnfqroRcMJnC87ZuJagDW1ZWCmU3psdsVanmFFh0DP6z0fsA4h8G2n9-qp-LEKF"
          "aWwo3IWlOsIzU3MHdcEiGw"},
]}, indent=2)
HS256_USER_ALICE = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ1c2VyIjoiYWxpY2UiLCJhenAiOiJhbGljZSIsInN1Ym9yZGluYXRlcyI6W10sImhyIjp"
    "mYWxzZX0.rz3jTY033z-NrKfwrK89_dcLF7TN4gwCMj-fVBDyLoM")
HS256_NBF_3000_1 = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJ4eHgiLCJuYmYiOjMwMDAuMX0.khHsSae91zHwuaTIvszln3kyrOdPyUYiGSv"
    "CI0j2ie8")
HS256_EXP_3000_2 = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjMwMDAuMiwiaXNzIjoieHh4In0.XUen7GtDmICV3O1ngsoO-tQrjrXtOgJI06o"
    "GW0nQSIM")
HS256_NBF_FRACTION = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJ4eHgiLCJuYmYiOjEuNTg5Mzg1NzcwMTIzNGUrMDl9.lvrsV1nam-BZr0SomW"
    "wsr4dBfu6BDrR2FzQ1iS_Xnrw")
HS256_EXP_FRACTION = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjEuNTg5Mzg1NzcxMTIzNGUrMDksImlzcyI6Inh4eCJ9.PZ2z6VfHt9YdvHHUbi"
    "lkTnw4R9TK3_V0LV1h-q0k9xg")
EDDSA_JOHN_DOE = (
    "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiYWRtaW4iOnRydWUsIm"
    "lhdCI6MTUxNjIzOTAyMn0.JkKWCY39IdWEQttmdqR7VdsvT-_QxheW_eb0S5wr_j83ltux_JDUIXs7a3Dtn3xuqzuhetiuJrWIvy5TzimeCg")
ED25519_PUBLIC = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAwmK6SSAu2E9V7uynkCKEaj5nZJyTvNG4x0KohsRzLpg=\n" \
                 "-----END PUBLIC KEY-----\n"

UNVERIFIED = [False, {}, {}]
RS256_HEADER = {"alg": "RS256", "typ": "JWT"}
HS256_HEADER = {"alg": "HS256", "typ": "JWT"}

# jwtdecodeverify/test-jwtdecodeverify-<n>.yaml: (note, token, constraints as Rego, expected)
DECODE_VERIFY = [
    ("0450 ps256-key-wrong", PS256_OTHER_ISSUER, {"cert": CERT_LOCALHOST}, UNVERIFIED),
    ("0451 rs256-key-wrong", RS256_EXP_3000, {"cert": CERT_LOCALHOST}, UNVERIFIED),
    ("0453 ps256-iss-wrong", PS256_OTHER_ISSUER, {"cert": CERT_WHATEVER, "iss": "yyy"}, UNVERIFIED),
    ("0454 ps256-alg-ok", PS256_OTHER_ISSUER, {"alg": "PS256", "cert": CERT_WHATEVER},
     [True, {"alg": "PS256", "typ": "JWT"}, {"iss": "xxx"}]),
    ("0455 ps256-alg-wrong", PS256_OTHER_ISSUER, {"alg": "RS256", "cert": CERT_WHATEVER}, UNVERIFIED),
    ("0456 rs256-exp-ok", RS256_EXP_3000, {"cert": CERT_WHATEVER, "time": 2000000000000},
     [True, RS256_HEADER, {"exp": 3000, "iss": "xxx"}]),
    ("0460 rs256-nbf-ok", RS256_NBF_1000, {"cert": CERT_WHATEVER, "time": 2000000000000},
     [True, RS256_HEADER, {"iss": "xxx", "nbf": 1000}]),
    ("0461 rs256-nbf-now-ok", RS256_NBF_1000, {"cert": CERT_WHATEVER},
     [True, RS256_HEADER, {"iss": "xxx", "nbf": 1000}]),
    ("0462 rs256-nbf-toosoon", RS256_NBF_1000, {"cert": CERT_WHATEVER, "time": 500000000000}, UNVERIFIED),
    ("0464 rs256-crit-junk", RS256_CRIT_JUNK, {"cert": CERT_WHATEVER}, UNVERIFIED),
    ("0465 rsa256-nested", RS256_NESTED, {"cert": CERT_WHATEVER}, [True, RS256_HEADER, {"iss": "xxx"}]),
    ("0469 hs256-key-wrong", HS256_USER_ALICE, {"secret": "the wrong key"}, UNVERIFIED),
    ("0470 rs256-aud", RS256_AUD_FRED, {"aud": "fred", "cert": CERT_WHATEVER},
     [True, RS256_HEADER, {"aud": "fred", "iss": "xxx"}]),
    ("0472 ps256-no-aud", PS256_OTHER_ISSUER, {"aud": "cath", "cert": CERT_WHATEVER}, UNVERIFIED),
    ("0474 rs256-wrong-aud", RS256_AUD_FRED, {"aud": "cath", "cert": CERT_WHATEVER}, UNVERIFIED),
    ("0476 multiple-keys-one-valid", RS256_JOHN_DOE, {"cert": JWKS_EC_AND_RSA, "time": 1574723450396363500},
     [True, RS256_HEADER, {"admin": True, "iat": 1516239022, "name": "John Doe", "sub": "1234567890"}]),
    ("0479 hs256-float-nbf-not-valid", HS256_NBF_3000_1, {"secret": "secret", "time": 2000000000000.1},
     UNVERIFIED),
    ("0480 hs256-float-exp-valid", HS256_EXP_3000_2, {"secret": "secret", "time": 2000000000000.1},
     [True, HS256_HEADER, {"exp": 3000.2, "iss": "xxx"}]),
    ("0482 hs256-float-nbf-one-tenth-second-before", HS256_NBF_FRACTION,
     {"secret": "secret", "time": 1589385770023400000}, UNVERIFIED),
    ("0484 hs256-float-one-millisecond-after-nbf", HS256_NBF_FRACTION,
     {"secret": "secret", "time": 1589385770124400000}, [True, HS256_HEADER, {"iss": "xxx", "nbf": 1589385770.1234}]),
    ("0486 hs256-float-one-second-after-nbf", HS256_NBF_FRACTION,
     {"secret": "secret", "time": 1589385771123400000}, [True, HS256_HEADER, {"iss": "xxx", "nbf": 1589385770.1234}]),
    ("0487 hs256-float-one-second-before-exp", HS256_EXP_FRACTION,
     {"secret": "secret", "time": 1589385770123400000}, [True, HS256_HEADER, {"exp": 1589385771.1234, "iss": "xxx"}]),
    ("0488 hs256-float-one-tenth-second-before-exp", HS256_EXP_FRACTION,
     {"secret": "secret", "time": 1589385771023400000}, [True, HS256_HEADER, {"exp": 1589385771.1234, "iss": "xxx"}]),
    ("0489 hs256-float-equal-exp", HS256_EXP_FRACTION, {"secret": "secret", "time": 1589385771123400000},
     UNVERIFIED),
    ("eddsa EdDSA", EDDSA_JOHN_DOE, {"cert": ED25519_PUBLIC},
     [True, {"alg": "EdDSA", "typ": "JWT"}, {"admin": True, "iat": 1516239022, "name": "John Doe",
                                              "sub": "1234567890"}]),
]


@pytest.mark.parametrize(("note", "token", "constraints", "want"), DECODE_VERIFY, ids=[c[0] for c in DECODE_VERIFY])
def test_jwt_decode_verify(note: str, token: str, constraints: dict[str, Any], want: Any) -> None:
    module = generated("p := [x, y, z] if {\n\t[x, y, z] := io.jwt.decode_verify(data.token, data.constraints)\n}\n")
    check(module, want, data={"token": token, "constraints": constraints})


def test_jwt_decode_verify_time_now_expired() -> None:
    # jwtdecodeverify/test-jwtdecodeverify-0459.yaml (rs256-exp-now-explicit-expired)
    module = generated("p := [x, y, z] if {\n\tnow := time.now_ns()\n\t[x, y, z] := io.jwt.decode_verify("
                       "data.token, {\"cert\": data.cert, \"time\": now})\n}\n")
    check(module, UNVERIFIED, data={"token": RS256_EXP_3000, "cert": CERT_WHATEVER})


def test_jwt_decode_verify_exp_not_a_number() -> None:
    # jwtdecodeverify/test-jwtdecodeverify-invalid-exp-type.yaml: OPA signs the token in the policy with
    # io.jwt.encode_sign (not provided here); the same token is signed here.
    header, claims = b64url(b'{"alg":"HS256"}'), b64url(b'{"exp":null}')
    signing_input = f"{header}.{claims}"
    token = f"{signing_input}.{b64url(hmac.new(b'42', signing_input.encode(), 'sha256').digest())}"
    module = generated(f"decoded := io.jwt.decode_verify({json.dumps(token)}, {{\"secret\": \"42\"}})\n")
    check(module, None, error="exp value must be a number", query="data.generated.decoded")


def test_jwt_verify_hs256() -> None:
    # jwtverifyhs256/test-jwtverifyhs256-0440.yaml
    check(generated(f"p := x if {{\n\tx := io.jwt.verify_hs256({json.dumps(HS256_USER_ALICE)}, \"secret\")\n}}\n"),
          True)


# --- io.jwt: what OPA counts as a key, and how it reads the header (v1/topdown/tokens.go) -------------------

def _hs256(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(hmac.new(key, signing_input.encode(), 'sha256').digest())}"


def _decode_verify(token: str, constraints: dict[str, Any], *, error: str | None = None, want: Any = None) -> None:
    check(generated("p := io.jwt.decode_verify(data.token, data.constraints)\n"), want, error=error,
          data={"token": token, "constraints": constraints})


def test_jwt_decode_verify_takes_an_empty_secret_as_no_key() -> None:
    # tokenConstraints.validate counts a secret only when it is not empty: a token HMAC'd with the empty key
    # is not verified by {"secret": ""}, and an empty secret beside a certificate is not a second key.
    token = _hs256({"alg": "HS256"}, {"sub": "admin"}, b"")
    _decode_verify(token, {"secret": ""}, error="io.jwt.decode_verify: no key constraint")
    signer = devpki.make_client(devpki.make_ca())
    signed = pyjwt.encode({"sub": "admin"}, signer.key, algorithm="ES256")
    _decode_verify(signed, {"cert": signer.pem.decode(), "secret": ""},
                   want=[True, {"alg": "ES256", "typ": "JWT"}, {"sub": "admin"}])
    _decode_verify(token, {"secret": "s", "cert": signer.pem.decode()}, error="duplicate key constraints")
    # io.jwt.verify_hs256 takes its secret as it is, the empty one too, as OPA does.
    check(generated("p := io.jwt.verify_hs256(data.token, \"\")\n"), True, data={"token": token})


def test_jwt_a_certificate_chain_is_refused_and_never_trusts_its_ca() -> None:
    # getKeysFromCertOrJWK decodes one PEM block and refuses anything after it.
    ca = devpki.make_ca()
    leaf = devpki.make_client(ca)
    chain = (leaf.pem + ca.pem).decode()
    by_ca = pyjwt.encode({"sub": "admin"}, ca.key, algorithm="ES256")
    by_leaf = pyjwt.encode({"sub": "admin"}, leaf.key, algorithm="ES256")
    extra = "extra data after a PEM certificate block"
    _decode_verify(by_ca, {"cert": chain}, error=f"io.jwt.decode_verify: {extra}")
    check(generated("p := io.jwt.verify_es256(data.token, data.key)\n"), None, error=f"io.jwt.verify_es256: {extra}",
          data={"token": by_ca, "key": chain})
    _decode_verify(by_ca, {"cert": leaf.pem.decode()}, want=UNVERIFIED)
    _decode_verify(by_leaf, {"cert": leaf.pem.decode()}, want=[True, {"alg": "ES256", "typ": "JWT"}, {"sub": "admin"}])
    _decode_verify(by_leaf, {"cert": leaf.pem.decode() + "\n"}, error=extra)  # Go's pem.Decode leaves "\n"
    _decode_verify(by_leaf, {"cert": leaf.key_pem.decode()}, error="failed to extract a Key from the PEM certificate")


def test_jwt_decode_verify_reads_the_header_as_opa_does() -> None:
    claims = {"sub": "admin"}
    # RFC 7515: no alg, or an alg OPA does not know, is an unverified token, not an error.
    _decode_verify(_hs256({"typ": "JWT"}, claims, b"s"), {"secret": "s"}, want=UNVERIFIED)
    _decode_verify(_hs256({"alg": "none"}, claims, b"s"), {"secret": "s"}, want=UNVERIFIED)
    _decode_verify(_hs256({"alg": "HS256", "kid": 5}, claims, b"s"), {"secret": "s"},
                   error="io.jwt.decode_verify: kid: must be a string")
    # A critical parameter OPA understands does not make the token invalid; one it does not, does.
    _decode_verify(_hs256({"alg": "HS256", "crit": ["alg"]}, claims, b"s"), {"secret": "s"},
                   want=[True, {"alg": "HS256", "crit": ["alg"]}, claims])
    _decode_verify(_hs256({"alg": "HS256", "crit": ["x"], "x": 1}, claims, b"s"), {"secret": "s"}, want=UNVERIFIED)
    # cty is compared without case: this payload is then read as a token, and is none.
    _decode_verify(_hs256({"alg": "HS256", "cty": "jwt"}, claims, b"s"), {"secret": "s"},
                   error="encoded JWT had no period separators")
    _decode_verify(_hs256({"alg": "HS256"}, claims, b"s"), {"secret": "s", "time": -1},
                   error="token time constraint: must not be negative")
    # Without an aud constraint, a token's aud must be "" (validAudience against the empty constraint).
    _decode_verify(_hs256({"alg": "HS256"}, {"aud": ""}, b"s"), {"secret": "s"},
                   want=[True, {"alg": "HS256"}, {"aud": ""}])
    _decode_verify(_hs256({"alg": "HS256"}, {"aud": "x"}, b"s"), {"secret": "s"}, want=UNVERIFIED)


def test_jwt_a_kid_picks_the_first_key_of_that_kid() -> None:
    good, other = devpki.new_key(), devpki.new_key()
    jwks = json.dumps({"keys": [
        {**json.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(other.public_key())), "kid": "k1"},
        {**json.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(good.public_key())), "kid": "k1"},
        {"kty": "RSA", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"},  # an algorithm OPA leaves out
    ]})
    token = pyjwt.encode({"sub": "admin"}, good, algorithm="ES256", headers={"kid": "k1"})
    _decode_verify(token, {"cert": jwks}, want=UNVERIFIED)
    untagged = pyjwt.encode({"sub": "admin"}, good, algorithm="ES256")
    _decode_verify(untagged, {"cert": jwks}, want=[True, {"alg": "ES256", "typ": "JWT"}, {"sub": "admin"}])


# --- crypto.* ----------------------------------------------------------------------------------------------

def test_crypto_hmac_sha256() -> None:
    # cryptohmacsha256/test-cryptohmacsha256.yaml
    module = "package test\n\np contains mac if {\n\tmac := crypto.hmac.sha256(input.message, input.key)\n}\n"
    check(module, ["147933218aaabc0b8b10a2b3a5c34684c8d94341bcf10a4736dc7270f7741851"], query="data.test.p",
          input_doc={"key": "bar", "message": "foo"})
    check(module, ["eb90daeb76d4b2571fbdaf94bbb240809faa8fed93ec0c260dd38c3fdf8d963a"], query="data.test.p",
          input_doc={"key": "秘密の", "message": "åäöçß\U0001F972♙Ω"})


# --- net.* -------------------------------------------------------------------------------------------------

V6 = "2601:600:8a80:207e:a57d:7567:e2c9:e7b3"

# netcidrmerge/test-ipv6-with-and-without-prefix.yaml
CIDR_MERGE = [
    ("cidr ipv6 with prefix", [f"{V6}/128"], [f"{V6}/128"], None),
    ("cidr ipv6 with prefix, same twice", [f"{V6}/128", f"{V6}/128"], [f"{V6}/128"], None),
    ("cidr ipv6 with prefix, two different prefixes", [f"{V6}/64", f"{V6}/128"], ["2601:600:8a80:207e::/64"], None),
    ("cidr ipv6 without prefix", [V6], None, "net.cidr_merge: IPv6 invalid: needs prefix length"),
    ("cidr ipv6 without prefix, same twice", [V6, V6], None, "net.cidr_merge: IPv6 invalid: needs prefix length"),
]


@pytest.mark.parametrize(("note", "addrs", "want", "error"), CIDR_MERGE, ids=[c[0] for c in CIDR_MERGE])
def test_net_cidr_merge(note: str, addrs: list[str], want: Any, error: str | None) -> None:
    check(f"package test\n\np := x if {{\n\tx := net.cidr_merge({json.dumps(addrs)})\n}}\n", want, error=error,
          query="data.test.p")


# netcidrcontainsmatches/test-netcidrcontainsmatches-0105, 0106, 0108.yaml
CIDR_CONTAINS_MATCHES = [
    ("arrays", '["1.1.2.0/24", "1.1.1.0/24"], ["1.1.1.1", "1.1.2.1"]', [[0, 1], [1, 0]]),
    ("arrays of tuples", '[["1.1.2.0/24", 1], "1.1.1.0/24"], ["1.1.1.1", "1.1.2.1"]', [[0, 1], [1, 0]]),
    ("sets of strings", '{"1.1.1.0/24", "1.1.2.0/24"}, {"1.1.1.1", "1.1.2.1"}',
     [["1.1.1.0/24", "1.1.1.1"], ["1.1.2.0/24", "1.1.2.1"]]),
]


@pytest.mark.parametrize(("note", "args", "want"), CIDR_CONTAINS_MATCHES, ids=[c[0] for c in CIDR_CONTAINS_MATCHES])
def test_net_cidr_contains_matches(note: str, args: str, want: Any) -> None:
    check(generated(f"p := x if {{\n\tx := net.cidr_contains_matches({args})\n}}\n"), want, unordered=True)


# netcidrcontainsmatches runs OPA's net.cidr_contains (v1/topdown/cidr.go) on each pair, over Go's net package.
CIDR_CONTAINS_MATCHES_AS_GO = [
    ("ipv4-mapped address in an ipv4 network", ["10.0.0.0/8"], ["::ffff:10.0.0.1"], [[0, 0]]),
    ("ipv4 address in an ipv4-mapped network", ["::ffff:10.0.0.0/104"], ["10.0.0.1"], [[0, 0]]),
    ("ipv4-mapped network in an ipv4 network", ["10.0.0.0/8"], ["::ffff:10.0.0.0/120"], [[0, 0]]),
    ("ipv4-mapped address outside the ipv4 network", ["10.0.0.0/8"], ["::ffff:11.0.0.1"], []),
    ("ipv4-mapped address is not in an ipv6 network", ["::/0"], ["::ffff:10.0.0.1"], []),
]


@pytest.mark.parametrize(("note", "cidrs", "ips", "want"), CIDR_CONTAINS_MATCHES_AS_GO,
                         ids=[c[0] for c in CIDR_CONTAINS_MATCHES_AS_GO])
def test_net_cidr_contains_matches_an_ipv4_mapped_address_as_its_ipv4_address(note: str, cidrs: list[str],
                                                                               ips: list[str], want: Any) -> None:
    module = generated("p := x if {\n\tx := net.cidr_contains_matches(data.cidrs, data.ips)\n}\n")
    check(module, want, data={"cidrs": cidrs, "ips": ips}, unordered=True)


@pytest.mark.parametrize(("cidrs", "ips", "error"), [
    (["10.0.0.1"], ["10.0.0.1"], "invalid CIDR address: 10.0.0.1"),
    (["10.0.0.0/255.0.0.0"], ["10.0.0.1"], "invalid CIDR address: 10.0.0.0/255.0.0.0"),
    (["fe80::/10"], ["fe80::1%eth0"], "not a valid textual representation of an IP address or CIDR: fe80::1%eth0"),
])
def test_net_cidr_contains_matches_refuses_what_go_does_not_parse(cidrs: list[str], ips: list[str],
                                                                   error: str) -> None:
    module = generated("p := x if {\n\tx := net.cidr_contains_matches(data.cidrs, data.ips)\n}\n")
    check(module, None, error=f"net.cidr_contains_matches: {error}", data={"cidrs": cidrs, "ips": ips})


def test_net_cidr_contains_matches_bad_set() -> None:
    # netcidrcontainsmatches/test-netcidrcontainsmatches-0110.yaml: OPA's error is "operand 2: element must be
    # string or non-empty array"; regorus cannot hand a set holding arrays to an extension at all, so the
    # evaluation fails before the builtin runs (still an error, so still a deny).
    module = generated('p := x if {\n\tv := data.a[0]\n\tx := net.cidr_contains_matches({["1.1.1.0/24", "bar"], '
                       '["1.1.2.0/24", "foo"]}, {v, ["1.1.2.1", "qux"]})\n}\n')
    check(module, None, error="unhashable type", data={"a": [1]})
    # The same check on operands the engine can pass gives OPA's message.
    check(generated('p := net.cidr_contains_matches(["1.1.1.0/24"], [1, ["1.1.2.1", "qux"]])\n'), None,
          error="net.cidr_contains_matches: operand 2: element must be string or non-empty array")


# --- strings.split_n, array.flatten ----------------------------------------------------------------------

# strings/test-splitn.yaml: (note, call, expected)
SPLIT_N = [
    ("positive_basic", 'strings.split_n("a.b.c.d", ".", 2)', ["a", "b"]),
    ("positive_one", 'strings.split_n("a.b.c.d", ".", 1)', ["a"]),
    ("positive_exact", 'strings.split_n("a.b.c.d", ".", 4)', ["a", "b", "c", "d"]),
    ("positive_more_than_parts", 'strings.split_n("a.b.c.d", ".", 10)', ["a", "b", "c", "d"]),
    ("zero", 'strings.split_n("a.b.c.d", ".", 0)', []),
    ("negative_basic", 'strings.split_n("a.b.c.d", ".", -2)', ["c", "d"]),
    ("negative_one", 'strings.split_n("a.b.c.d", ".", -1)', ["d"]),
    ("negative_exact", 'strings.split_n("a.b.c.d", ".", -4)', ["a", "b", "c", "d"]),
    ("negative_more_than_parts", 'strings.split_n("a.b.c.d", ".", -10)', ["a", "b", "c", "d"]),
    ("no_delimiter_found_positive", 'strings.split_n("abc", ".", 2)', ["abc"]),
    ("no_delimiter_found_negative", 'strings.split_n("abc", ".", -2)', ["abc"]),
    ("empty_string", 'strings.split_n("", ".", 2)', [""]),
    ("empty_delimiter_positive", 'strings.split_n("abc", "", 2)', ["a", "b"]),
    ("empty_delimiter_negative", 'strings.split_n("abc", "", -2)', ["b", "c"]),
    ("non_integer_n", 'strings.split_n("a.b.c", ".", 1.5)', ERROR),
]


@pytest.mark.parametrize(("note", "call", "want"), SPLIT_N, ids=[c[0] for c in SPLIT_N])
def test_strings_split_n(note: str, call: str, want: Any) -> None:
    module = f"package test\n\np := result if {{\n\tresult := {call}\n}}\n"
    if want is ERROR:
        check(module, None, query="data.test.p",
              error="strings.split_n: operand 3 must be integer number but got floating-point number")
    else:
        check(module, want, query="data.test.p")


def test_strings_split_n_use_cases() -> None:
    # strings/test-splitn.yaml: usecase_positive, usecase_negative
    module = 'package test\n\np := [name, email] if {\n\t[name, email] := strings.split_n(input.user, ";", %s)\n}\n'
    check(module % "2", ["alice", "alice@example.com"], query="data.test.p",
          input_doc={"user": "alice;alice@example.com;admin;active"})
    check(module % "-2", ["alice", "alice@example.com"], query="data.test.p",
          input_doc={"user": "admin;active;alice;alice@example.com"})


# array/flatten.yaml
FLATTEN = [
    ("empty array", [], []),
    ("only arrays", [[1, 2], [3, 4], [5]], [1, 2, 3, 4, 5]),
    ("has nesting depth 1", [[[1], [2, 3, []]], [[4, 5]]], [[1], [2, 3, []], [4, 5]]),
    ("mixed types", [[1, 2], "string", [3, {"a": "b"}], 4.5, [6, [7, 8]]],
     [1, 2, "string", 3, {"a": "b"}, 4.5, 6, [7, 8]]),
]


@pytest.mark.parametrize(("note", "foo", "want"), FLATTEN, ids=[c[0] for c in FLATTEN])
def test_array_flatten(note: str, foo: Any, want: Any) -> None:
    check("package test\n\np := array.flatten(data.foo)\n", want, query="data.test.p", data={"foo": foo})


def test_array_flatten_type_error() -> None:
    check("package test\n\np := array.flatten(data.foo)\n", None, query="data.test.p", data={"foo": 42},
          error="array.flatten: operand 1 must be array but got number")


# --- crypto.x509.parse_certificates ------------------------------------------------------------------------

CERT_OPA_ORG = """-----BEGIN CERTIFICATE-----
MIIFdzCCBF+gAwIBAgISA3NriAEus/+cvflvhVQOW5zTMA0GCSqGSIb3DQEBCwUA
MEoxCzAJBgNVBAYTAlVTMRYwFAYDVQQKEw1MZXQncyBFbmNyeXB0MSMwIQYDVQQD
ExpMZXQncyBFbmNyeXB0IEF1dGhvcml0eSBYMzAeFw0yMDA3MTAxNjAwMzBaFw0y
MDEwMDgxNjAwMzBaMB4xHDAaBgNVBAMTE29wZW5wb2xpY3lhZ2VudC5vcmcwggEi
MA0GCSqGSIb3DQEBAQUAA4IBDwAwggEKAoIBAQCyy8HZXVTJ2TSHXYnoL+CKYpo4
wz1wowUcdt/XBgN08f37NxaNk+VAj8GD2s6zhoHLShyYS2PVosf7xumvyG914PLp
IHO9WmCaZMqwEyvMM/VE9dBkKfaTo78BT6aXyJmnkjpeFmBOGs3uP5bUARj3Onnr
7Aos9j45rgrytpelYTMlLi6jVtBv5RIZuMoJ15W252t8eIgsOq57ad0Bobeyy4Tu
GhveP0V3vUJvI3ibqH5E9cWzI2f8UtoirUNf0J3tcng8JqSOuuzWDYWrRDAzQbJY
qKzvVDcN+ptqV7GZ6JuqHhdwgDeqBOsveDbzAAyYSVPJjRWYea8MxlM7OXbtAgMB
AAGjggKBMIICfTAOBgNVHQ8BAf8EBAMCBaAwHQYDVR0lBBYwFAYIKwYBBQUHAwEG
CCsGAQUFBwMCMAwGA1UdEwEB/wQCMAAwHQYDVR0OBBYEFHDweb6KprSvWrw/vR6k
wTVpudPtMB8GA1UdIwQYMBaAFKhKamMEfd265tE5t6ZFZe/zqOyhMG8GCCsGAQUF
BwEBBGMwYTAuBggrBgEFBQcwAYYiaHR0cDovL29jc3AuaW50LXgzLmxldHNlbmNy
eXB0Lm9yZzAvBggrBgEFBQcwAoYjaHR0cDovL2NlcnQuaW50LXgzLmxldHNlbmNy
eXB0Lm9yZy8wNwYDVR0RBDAwLoITb3BlbnBvbGljeWFnZW50Lm9yZ4IXd3d3Lm9w
ZW5wb2xpY3lhZ2VudC5vcmcwTAYDVR0gBEUwQzAIBgZngQwBAgEwNwYLKwYBBAGC
3xMBAQEwKDAmBggrBgEFBQcCARYaaHR0cDovL2Nwcy5sZXRzZW5jcnlwdC5vcmcw
ggEEBgorBgEEAdZ5AgQCBIH1BIHyAPAAdgBep3P531bA57U2SH3QSeAyepGaDISh
EhKEGHWWgXFFWAAAAXM5q9vDAAAEAwBHMEUCIQCRHqgrtl07Y6TryfMmQN6TNKRV
m1LTy9vI3Mh/krbSQQIgYgVAKwXRoPR+BN1pcJbJv3Aivbh6E7L987rMSEQk5VoA
dgCyHgXMi6LNiiBOh2b5K7mKJSBna9r6cOeySVMt74uQXgAAAXM5q9uuAAAEAwBH
MEUCIQDdruTutQ/UchckqYQ+2p9mutnrSnnQXa8xLA41YGzZHgIgXXETFbGfns2C
7YJ8cDoYYAjmdzMg8k7hKXQGu/KsAb4wDQYJKoZIhvcNAQELBQADggEBAGk9p5yt
OaDIPRPk5ImpH1f6f010mULWPV5Pjn6kzMHP9z5ndMz++1NOvHV4GVBCoeuKq1bp
FCD+IgA9pcJAEXQ/u4GpmbAKUZzmfMIb89aRgnJp0mx9Y4BBd45ExUWs8w4cfgFZ
yZUeHvWs1anpAcR2FIZpAVMQCaIgjOt2ddR1xv4acCw+mD/B9oKfGZEUgyIANvpB
IDabggLSwFa9OKKXRBVRAafo7Oac21HQU7E3sXphaHZGfn2F27dD/qoqUcLqr4lC
c7lNE0YGp6r+aPo9VLcH2V0lN4t+1VbVArwKznsNdcQnwKBetgqvZrgLg4+qjo4y
uixJY38XU/b7baU=
-----END CERTIFICATE-----"""

# cryptox509parsecertificates/test-cryptox509parsecertificates-raw-uris.yaml (base64 of a PEM certificate)
CERT_SPIFFE_B64 = (
    "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUIxekNDQVh5Z0F3SUJBZ0lJZGxpT1dVY1NXM3N3Q2dZSUtvWkl6ajBFQXdJd1BURUxN"
    "QWtHQTFVRUJoTUMKUjBJeEVEQU9CZ05WQkFvVEIwVjRZVzF3YkdVeEhEQWFCZ05WQkFVVEV6RTFPREV4TnpnNU56UTJPRFkxTmpneQpOalF3"
    "SUJjTk1qTXhNVEl3TVRZMU5USTRXaGdQTWpFeU1qRXdNamN4TmpVMU1qaGFNRDB4Q3pBSkJnTlZCQVlUCkFrZENNUkF3RGdZRFZRUUtFd2RG"
    "ZUdGdGNHeGxNUnd3R2dZRFZRUUZFeE00TlRJM056SXlOREE0TlRJeE5qVXoKTVRFMU1Ga3dFd1lIS29aSXpqMENBUVlJS29aSXpqMERBUWNE"
    "UWdBRXp0UDNrQnNpQXY4UUF5eWxUalJZSFlWegpjWTB5YmpBdC9VbWpZb3Fxb0o4SEtIdXF1ckRaUmVwa05qUXdwV3pmZndZZ0xaNk42SisyV"
    "UlPdlZ0TDZEcU5rCk1HSXdEZ1lEVlIwUEFRSC9CQVFEQWdlQU1CMEdBMVVkSlFRV01CUUdDQ3NHQVFVRkJ3TUNCZ2dyQmdFRkJRY0QKQVRB"
    "TUJnTlZIUk1CQWY4RUFqQUFNQ01HQTFVZEVRUWNNQnFHR0hOd2FXWm1aVG92TDJWNFlXMXdiR1V1WTI5dApMMjl3WVRBS0JnZ3Foa2pPUFFR"
    "REFnTkpBREJHQWlFQXlRNDhPd25lTHkzMjZqYitEUjd5RjJhcS94Wnl1cW9qCitUU3ZLVVB5NEU0Q0lRQ0VMUlp3K0dWTjhJR0drVGV4MGxx"
    "TDNxY21mWldJbm15VitrbnQ0d3p3L3c9PQotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg==")


def test_x509_parse_certificates() -> None:
    # cryptox509parsecertificates/test-cryptox509parsecertificates-0120.yaml (PEM, single cert, string)
    module = generated("p := [cn | cn := crypto.x509.parse_certificates(data.certs)[_].Subject.CommonName]\n")
    check(module, ["openpolicyagent.org"], data={"certs": CERT_OPA_ORG})
    # ...-0123.yaml (invalid DER or PEM data, b64)
    check(module, None, error="x509: malformed certificate", data={"certs": "YmFkc3RyaW5n"})
    # ...-raw-uris.yaml (uri_strings)
    check(generated("uri_strings := crypto.x509.parse_certificates(data.certs)[0].URIStrings\n"),
          ["spiffe://example.com/opa"], query="data.generated.uri_strings", data={"certs": CERT_SPIFFE_B64})


# --- how the extensions are wired in ---------------------------------------------------------------------

def test_every_nondeterministic_builtin_turns_the_decision_cache_off() -> None:
    for ext in EXTENSIONS:
        if not ext.deterministic:
            assert ext.name in NONDETERMINISTIC, ext.name
            assert DecisionCache.for_modules([f"package p\nx := {ext.name}(input.a, {{}})\n"], 10) is None


def test_no_builtin_of_the_engine_is_replaced() -> None:
    assert native_builtins(), "regorus reports its builtins"
    replacing = {ext.name for ext in EXTENSIONS if ext.replaces_native}
    assert {ext.name for ext in EXTENSIONS} & native_builtins() == replacing == {"net.cidr_contains"}


def test_every_engine_pdp_builds_has_the_builtins(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text(
        'package pdp.authz\n\nresult := {"allowed": crypto.sha256(input.x) == data.want, '
        '"parts": strings.split_n(input.x, "-", 1)}\n')
    bundle = load_bundle([tmp_path], entrypoint="pdp/authz/result", engine="regorus")
    engine = PolicyEngine(bundle)
    want = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    bundle2 = PolicyBundle(bundle.modules, {"want": want}, bundle.entrypoint, "regorus")
    assert PolicyEngine(bundle2).evaluate({"x": "hello"}) == {"allowed": True, "parts": ["hello"]}
    with pytest.raises(PolicyEvalError, match=r"crypto\.sha256: operand 1 must be string but got number"):
        engine.evaluate({"x": 1})
    assert RegorusEvaluator(bundle2).query("data.pdp.authz.result", {"x": "hello"})["allowed"] is True


def test_output_argument_form_is_refused_at_load() -> None:
    # OPA accepts io.jwt.decode(t, [h, p, s]); regorus does not for extension functions. It is refused when
    # the module is compiled, never evaluated to a different answer.
    with pytest.raises(RuntimeError, match="unsafe"):
        evaluate(generated('p := [x, y, z] if {\n\tio.jwt.decode("a.b.c", [x, y, z])\n}\n'), "data.generated.p")


# Signatures the decode_verify cases above establish as valid (or not) for their keys, through io.jwt.verify_*.
VERIFY = [
    ("io.jwt.verify_ps256", PS256_OTHER_ISSUER, CERT_WHATEVER, True),
    ("io.jwt.verify_ps256", PS256_OTHER_ISSUER, CERT_LOCALHOST, False),
    ("io.jwt.verify_rs256", RS256_EXP_3000, CERT_WHATEVER, True),
    ("io.jwt.verify_rs256", RS256_EXP_3000, CERT_LOCALHOST, False),
    ("io.jwt.verify_rs256", RS256_JOHN_DOE, JWKS_EC_AND_RSA, True),
    ("io.jwt.verify_eddsa", EDDSA_JOHN_DOE, ED25519_PUBLIC, True),
    ("io.jwt.verify_es256", RS256_EXP_3000, CERT_WHATEVER, False),
    ("io.jwt.verify_hs256", HS256_USER_ALICE, "the wrong key", False),
]


@pytest.mark.parametrize(("name", "token", "key", "want"), VERIFY)
def test_jwt_verify(name: str, token: str, key: str, want: bool) -> None:
    check(generated(f"p := {name}(data.token, data.key)\n"), want, data={"token": token, "key": key})


@pytest.mark.parametrize(("cidr", "ip", "expected"), [
    ("10.0.0.0/8", "::ffff:10.0.0.1", True),     # a dual-stack socket's IPv4 client
    ("10.0.0.0/8", "10.1.2.3", True),
    ("10.0.0.0/8", "11.0.0.1", False),
    ("10.0.0.0/8", "10.0.0.0/16", True),
    ("10.0.0.0/16", "10.0.0.0/8", False),
    ("2001:db8::/32", "2001:db8::1", True),
])
def test_net_cidr_contains_sees_ipv4_mapped_clients_as_opa_does(cidr: str, ip: str, expected: bool) -> None:
    """regorus's own net.cidr_contains answered false for '::ffff:10.0.0.1' in 10.0.0.0/8, which lets an
    IPv4 client on a dual-stack socket past a denylist; OPA (Go's IPNet.Contains) answers true."""
    import regorus

    engine = regorus.Engine()
    register(engine)
    engine.add_policy("t.rego", f'package t\nx := net.cidr_contains("{cidr}", "{ip}")\n')
    assert engine.eval_rule("data.t.x") is expected
