//! Text tables of the client commands: borderless columns, so the output reads like `ps` and
//! stays easy to cut with `awk` (`--output json` is the format for scripts).

use comfy_table::{CellAlignment, Table, presets::NOTHING};

/// A borderless table under `header`; the columns at the indexes in `numeric` are
/// right-aligned.
pub(crate) fn plain_table(header: &[&str], numeric: &[usize]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(header.to_vec());
    let last = header.len().saturating_sub(1);
    for (index, column) in table.column_iter_mut().enumerate() {
        // Two blanks between columns and none at the start of a line.
        column.set_padding((0, if index == last { 0 } else { 2 }));
        if numeric.contains(&index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// Prints `table` without trailing blanks.
pub(crate) fn print_table(table: &Table) {
    println!("{}", table.trim_fmt());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_separated_by_blanks_and_numbers_align_right() {
        let mut table = plain_table(&["QUEUE", "DEPTH", "OLDEST"], &[1]);
        table.add_row(vec!["jobs", "3", "12ms"]);
        table.add_row(vec!["thumbnails", "1024", "-"]);
        assert_eq!(
            table.trim_fmt(),
            "QUEUE       DEPTH  OLDEST\n\
             jobs            3  12ms\n\
             thumbnails   1024  -"
        );
    }
}
