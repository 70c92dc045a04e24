!> A strict check of JSON text (RFC 8259, UTF-8): the model file's metadata
!! must be a JSON object, nested at most 64 levels deep, as the Python
!! reader (json.loads) requires. Nothing is parsed into values.
module pykd_json
  implicit none
  private
  public :: json_object_ok, MAX_DEPTH

  !> Deepest nesting of objects and arrays accepted (the top object is level 1).
  integer, parameter :: MAX_DEPTH = 64
  !> Longest integer literal (digits): Python's int() limit, which json.loads hits.
  integer, parameter :: MAX_INT_DIGITS = 4300
  ! Why a value failed, beyond a syntax error.
  integer, parameter :: BIG_INT = 1, LONE_SURROGATE = 2

contains

  !> The metadata is UTF-8 JSON text whose value is an object, nested at
  !! most MAX_DEPTH levels deep; else msg says why, in the Python reader's words.
  logical function json_object_ok(text, msg) result(ok)
    character(len=*), intent(in) :: text
    character(len=*), intent(inout) :: msg
    integer :: p, depth, issue
    ok = .false.
    if (.not. utf8_ok(text)) then
      msg = 'metadata is not valid UTF-8 JSON (invalid UTF-8)'
      return
    end if
    p = 1
    depth = 0
    issue = 0
    ok = json_value(text, p, 1, depth, issue)
    if (ok) then
      p = skip_ws(text, p)
      ok = p > len(text)
    end if
    if (.not. ok) then
      if (depth > MAX_DEPTH) then
        msg = 'metadata is nested more than 64 levels deep'
      else if (issue == BIG_INT) then
        msg = 'metadata is not valid UTF-8 JSON (an integer of more than 4300 digits, '// &
              'Python''s limit)'
      else if (issue == LONE_SURROGATE) then
        msg = 'metadata holds a lone surrogate \uD800-\uDFFF (not valid Unicode)'
      else
        msg = 'metadata is not valid UTF-8 JSON (syntax error near byte '//itoa(min(p, len(text)))//')'
      end if
      return
    end if
    p = skip_ws(text, 1)
    ok = text(p:p) == '{'
    if (.not. ok) msg = 'metadata is not a JSON object'
  end function json_object_ok

  pure integer function skip_ws(s, p0) result(p)
    character(len=*), intent(in) :: s
    integer, intent(in) :: p0
    p = p0
    do while (p <= len(s))
      if (index(' '//achar(9)//achar(10)//achar(13), s(p:p)) == 0) exit
      p = p + 1
    end do
  end function skip_ws

  !> One JSON value at s(p:) (after white space); p moves past it.
  !! `deepest` records the deepest nesting seen (to name the failure).
  recursive logical function json_value(s, p, depth, deepest, issue) result(ok)
    character(len=*), intent(in) :: s
    integer, intent(inout) :: p, deepest, issue
    integer, intent(in) :: depth
    ok = .false.
    p = skip_ws(s, p)
    if (p > len(s)) return
    select case (s(p:p))
    case ('{', '[')
      deepest = max(deepest, depth)
      if (depth > MAX_DEPTH) return
      ok = json_container(s, p, depth, deepest, issue)
    case ('"')
      ok = json_string(s, p, issue)
    case ('t')
      ok = literal('true')
    case ('f')
      ok = literal('false')
    case ('n')
      ok = literal('null')
    case default
      ok = json_number(s, p, issue)
    end select
  contains
    logical function literal(word)
      character(len=*), intent(in) :: word
      literal = .false.
      if (p + len(word) - 1 > len(s)) return
      if (s(p:p + len(word) - 1) /= word) return
      p = p + len(word)
      literal = .true.
    end function literal
  end function json_value

  !> An object or array at s(p:).
  recursive logical function json_container(s, p, depth, deepest, issue) result(ok)
    character(len=*), intent(in) :: s
    integer, intent(inout) :: p, deepest, issue
    integer, intent(in) :: depth
    character :: close
    logical :: is_object
    ok = .false.
    is_object = s(p:p) == '{'
    close = merge('}', ']', is_object)
    p = skip_ws(s, p + 1)
    if (p > len(s)) return
    if (s(p:p) == close) then
      p = p + 1
      ok = .true.
      return
    end if
    do
      if (is_object) then
        p = skip_ws(s, p)
        if (p > len(s)) return
        if (s(p:p) /= '"') return
        if (.not. json_string(s, p, issue)) return
        p = skip_ws(s, p)
        if (p > len(s)) return
        if (s(p:p) /= ':') return
        p = p + 1
      end if
      if (.not. json_value(s, p, depth + 1, deepest, issue)) return
      p = skip_ws(s, p)
      if (p > len(s)) return
      if (s(p:p) == close) exit
      if (s(p:p) /= ',') return
      p = p + 1
    end do
    p = p + 1
    ok = .true.
  end function json_container

  !> A string at s(p:) (s(p:p) == '"'): no raw control characters, valid escapes.
  logical function json_string(s, p, issue) result(ok)
    character(len=*), intent(in) :: s
    integer, intent(inout) :: p, issue
    integer :: c, u
    ok = .false.
    p = p + 1
    do while (p <= len(s))
      c = iachar(s(p:p))
      if (c < 32) return
      if (s(p:p) == '"') then
        p = p + 1
        ok = .true.
        return
      end if
      if (s(p:p) == '\') then
        if (p + 1 > len(s)) return
        if (s(p + 1:p + 1) == 'u') then
          if (.not. hex4(p + 2, u)) return
          p = p + 6
          ! A high surrogate must be followed by a low one, as a pair.
          if (u >= 56320 .and. u <= 57343) then
            issue = LONE_SURROGATE
            return
          end if
          if (u >= 55296 .and. u <= 56319) then
            if (p + 1 > len(s)) return
            if (s(p:p + 1) /= '\u') then
              issue = LONE_SURROGATE
              return
            end if
            if (.not. hex4(p + 2, u)) return
            if (u < 56320 .or. u > 57343) then
              issue = LONE_SURROGATE
              return
            end if
            p = p + 6
          end if
          cycle
        end if
        if (index('"\/bfnrt', s(p + 1:p + 1)) == 0) return
        p = p + 2
        cycle
      end if
      p = p + 1
    end do
  contains
    !> The 4 hex digits at s(q:q+3), as u.
    logical function hex4(q, u)
      integer, intent(in) :: q
      integer, intent(out) :: u
      u = 0
      hex4 = q + 3 <= len(s)
      if (.not. hex4) return
      hex4 = verify(s(q:q + 3), '0123456789abcdefABCDEF') == 0
      if (hex4) read (s(q:q + 3), '(z4)') u
    end function hex4
  end function json_string

  !> A number at s(p:): -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
  logical function json_number(s, p, issue) result(ok)
    character(len=*), intent(in) :: s
    integer, intent(inout) :: p, issue
    integer :: int_start, int_end
    ok = .false.
    if (p <= len(s)) then
      if (s(p:p) == '-') p = p + 1
    end if
    if (p > len(s)) return
    int_start = p
    if (s(p:p) == '0') then
      p = p + 1
    else if (.not. has_digits()) then
      return
    end if
    int_end = p
    if (p <= len(s)) then
      if (s(p:p) == '.') then
        p = p + 1
        if (.not. has_digits()) return
      end if
    end if
    if (p <= len(s)) then
      if (s(p:p) == 'e' .or. s(p:p) == 'E') then
        p = p + 1
        if (p <= len(s)) then
          if (s(p:p) == '+' .or. s(p:p) == '-') p = p + 1
        end if
        if (.not. has_digits()) return
      end if
    end if
    ! Python reads a literal without fraction or exponent as an int.
    if (p == int_end .and. int_end - int_start > MAX_INT_DIGITS) then
      issue = BIG_INT
      return
    end if
    ok = .true.
  contains
    logical function has_digits()
      integer :: p0
      p0 = p
      do while (p <= len(s))
        if (s(p:p) < '0' .or. s(p:p) > '9') exit
        p = p + 1
      end do
      has_digits = p > p0
    end function has_digits
  end function json_number

  !> Strict UTF-8 (as Python's decoder): no overlong forms, no surrogates,
  !! nothing above U+10FFFF.
  pure logical function utf8_ok(s) result(ok)
    character(len=*), intent(in) :: s
    integer :: p, c, n, k, cp, lo
    ok = .false.
    p = 1
    do while (p <= len(s))
      c = iachar(s(p:p))
      if (c < 128) then
        p = p + 1
        cycle
      else if (c >= 194 .and. c <= 223) then
        n = 1; cp = c - 192; lo = 128
      else if (c >= 224 .and. c <= 239) then
        n = 2; cp = c - 224; lo = 2048
      else if (c >= 240 .and. c <= 244) then
        n = 3; cp = c - 240; lo = 65536
      else
        return
      end if
      if (p + n > len(s)) return
      do k = 1, n
        c = iachar(s(p + k:p + k))
        if (c < 128 .or. c > 191) return
        cp = cp * 64 + (c - 128)
      end do
      if (cp < lo .or. cp > 1114111 .or. (cp >= 55296 .and. cp <= 57343)) return
      p = p + n + 1
    end do
    ok = .true.
  end function utf8_ok

  pure function itoa(i) result(s)
    integer, intent(in) :: i
    character(len=:), allocatable :: s
    character(len=12) :: tmp
    write (tmp, '(i0)') i
    s = trim(tmp)
  end function itoa

end module pykd_json
